"""Shared fixtures: a tiny generated Llama (built once per session) and the real assets when present."""
from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_VOCAB = 400
TINY_SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>"]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

_WORDS = ("the of and to a in that it was her she not be he his as had with for you which but on all is at "
          "have by my so no said mr would were elinor marianne could been they very sister mother time more "
          "own every being such what think than well only must before much little know might any house "
          "Dashwood Willoughby Edward colonel Barton Norland morning evening letter feelings happiness")


def tiny_corpus(n_words: int = 1500, seed: int = 0) -> str:
    """A few KB of deterministic English-like text with punctuation, digits and a little Unicode."""
    rng = random.Random(seed)
    words = _WORDS.split()
    out, line = [], []
    for i in range(n_words):
        w = rng.choice(words)
        if not line:
            w = w.capitalize()
        line.append(w)
        if rng.random() < 0.08:
            line[-1] += rng.choice([",", ";", "!", "?", "."])
        if rng.random() < 0.03:
            line.append(str(rng.randint(1, 2024)))
        if rng.random() < 0.01:
            line.append(rng.choice(["café", "naïve", "—", "“quoted”", "  spaced", "\ttab"]))
        if len(line) > 12 and rng.random() < 0.2:
            out.append(" ".join(line) + ".")
            line = []
    out.append(" ".join(line) + ".")
    return "\n".join(out) + "\n"


def build_tiny_tokenizer(dest, seed: int = 0, texts=None, vocab_size: int = TINY_VOCAB,
                         chat_template: str | None = TINY_CHAT_TEMPLATE, **config):
    """A byte-level BPE tokenizer trained on ``texts`` (default: the tiny corpus), with specials and a chat
    template, saved to ``dest`` (bench/float_model.py trains one on the novels)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or [tiny_corpus(seed=seed)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>", pad_token="<pad>", **config)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(dest)
    return fast


def build_tiny_spm_tokenizer(dest, seed: int = 0):
    """A SentencePiece BPE tokenizer.model (byte fallback, Gemma-style) trained on the tiny corpus, and the
    Gemma tokenizer transformers builds from it, saved to ``dest``."""
    import json
    from pathlib import Path

    import sentencepiece as spm
    from transformers import AutoTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed=seed).splitlines()), model_prefix=str(dest / "tokenizer"),
        vocab_size=TINY_VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, split_digits=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2)
    (dest / "tokenizer.vocab").unlink()
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "chat_template": TINY_CHAT_TEMPLATE}))
    return AutoTokenizer.from_pretrained(dest)


def build_tiny_model(dest, config_class: str, seed: int = 0, tokenizer_class: str | None = None,
                     sentencepiece: bool = False, **config):
    """Write a tiny Hugging Face model folder (float32 safetensors, config of transformers' ``config_class``,
    the tiny byte-level BPE tokenizer or, with ``sentencepiece``, a SentencePiece one) with random weights
    and non-trivial norms."""
    import json
    from pathlib import Path

    import torch
    import transformers

    fast = build_tiny_spm_tokenizer(dest, seed) if sentencepiece else build_tiny_tokenizer(dest, seed)
    if tokenizer_class:  # what llama.cpp's converter reads to choose the vocabulary reader (phi3)
        tc = Path(dest) / "tokenizer_config.json"
        tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": tokenizer_class}))
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_class)(vocab_size=len(fast), bos_token_id=fast.bos_token_id,
                                              eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                                              initializer_range=0.08, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    with torch.no_grad():  # non-trivial norms so their handling is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if "gemma" in cfg.model_type else 1.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny_llama(dest, seed: int = 0, **shape):
    """Write a tiny Hugging Face Llama folder; ``shape`` overrides TINY's sizes (bench/train_speed.py builds
    SmolLM2's block shapes this way)."""
    return build_tiny_model(dest, "LlamaConfig", seed, **{**TINY, **shape})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a tiny Llama: hidden 256, ffn 512, 2 blocks, 4 heads, 2 KV heads, untied, vocab ~400."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from toolkit.assets import smollm2_path

    p = smollm2_path()
    if not p.exists():
        pytest.skip(f"SmolLM2 asset missing ({p}); run `coalora assets --fetch`")
    return p


def austen_text(name: str) -> str:
    """The text of an Austen novel, or skip the test when the asset is missing."""
    from toolkit.assets import novel_path

    p = novel_path(name)
    if not p.exists():
        pytest.skip(f"Austen text missing ({p}); run `coalora assets --fetch`")
    return p.read_text()


# Small settings for the SmolLM2 run the integration tests share.
SMOLLM2_RUN_OPTIONS = dict(steps=6, seq_len=64, batch=2, rounds=2, search_candidates=4, checkpoint_every=6,
                           lr=2e-3, cam_lr=2e-3)


@pytest.fixture(scope="session")
def smollm2_run(smollm2_gguf, tmp_path_factory):
    """A small trained CoA-LoRA run on SmolLM2 with Austen (a ``toolkit.run.Run``), shared by integration tests."""
    from toolkit import assets
    from toolkit.training import TrainOptions, train

    texts = [assets.novel_path(n) for n in assets.TRAIN_NOVELS]
    if not all(p.exists() for p in texts):
        pytest.skip("Austen text missing; run `coalora assets --fetch`")
    return train(tmp_path_factory.mktemp("smollm2") / "run", smollm2_gguf, texts[:1],
                 TrainOptions(**SMOLLM2_RUN_OPTIONS), progress=False, log=lambda s: None)


@pytest.fixture(scope="session")
def fuzz_workdir(tmp_path_factory):
    """A fuzz work folder (bench/fuzz) whose shared inputs, a tiny GGUF and a trained tiny run, are built
    once per session through the CLI."""
    from bench.fuzz.cases import Fixtures

    wd = tmp_path_factory.mktemp("fuzz")
    Fixtures(wd).run()
    return wd
