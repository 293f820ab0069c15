"""Runs llama.cpp's ``convert_hf_to_gguf.py`` (in a child process, with llama.cpp's own gguf-py).

Usage: python llama_cpp_converter_runner.py CONVERTER_DIR [convert_hf_to_gguf.py arguments...]

llama.cpp names a byte-level BPE pre-tokenizer by hashing the tokenization of a test string, so a
tokenizer it has never seen (a fine-tuned vocabulary, the tests' tiny ones) is refused even when its
pre-tokenizer is a standard one. When the hash is unknown, this runner reads the pre-tokenizer of the
tokenizer the converter loaded (transformers may impose a model type's own, e.g. Qwen2's) and accepts
the plain GPT-2 one, SmolLM's (digits + GPT-2) and Qwen2's split regex; anything else stays llama.cpp's
error. Nothing else of the converter is changed.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

_QWEN2_SPLIT = json.dumps({"type": "Split", "pattern": {"Regex": (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")}, "behavior": "Isolated", "invert": False}, sort_keys=True)
# pre-tokenizer (simplified description) -> llama.cpp pre-tokenizer name
KNOWN_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def describe_pre_tokenizer(pre: dict | None) -> tuple:
    if pre is None:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(x for p in pre.get("pretokenizers", []) for x in describe_pre_tokenizer(p))
    t = pre.get("type")
    if t == "ByteLevel":
        return ((t, bool(pre.get("use_regex", True)) and not pre.get("add_prefix_space", False)),)
    if t == "Digits":
        return ((t, bool(pre.get("individual_digits", False))),)
    return ((t, json.dumps(pre, sort_keys=True)),)


def pre_tokenizer_name(tokenizer, tokenizer_json: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer ``tokenizer`` (a transformers tokenizer) really applies."""
    try:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str() if backend is not None else tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return KNOWN_PRE_TOKENIZERS.get(describe_pre_tokenizer(spec.get("pre_tokenizer")))


def main() -> None:
    converter = Path(sys.argv[1])
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    from conversion.base import TextModel  # llama.cpp's converter package

    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_name(tokenizer, Path(self.dir_model) / "tokenizer.json")
            if name is None:
                raise
            return name

    TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(converter / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
