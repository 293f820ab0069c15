"""The importance matrix of a model over a text, computed in torch as llama.cpp's imatrix tool collects it.

For every block weight matrix (``blk.*``; ``output.weight`` too with ``process_output``, as
``llama-imatrix --process-output``), a forward pre-hook on its projection adds each input column's squared
activation over all tokens to ``in_sum2`` and the number of tokens to ``counts``. Running text is cut into
consecutive chunks of ``seq_len`` tokens, the first token of each replaced by BOS when the model's GGUF asks
for one (``tokenizer.ggml.add_bos_token``), as llama-imatrix does; padded record windows count their tokens
up to the padding. The model is the float model ``coalora train`` trains (no adapter), on the GPU when one is
given.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.errors import CoaloraError
from converters.imatrix import Imatrix


def _add_bos(loaded) -> int | None:
    get = loaded.gguf.reader.get_field
    add, bos = get("tokenizer.ggml.add_bos_token"), get("tokenizer.ggml.bos_token_id")
    if add is None or not bool(add.contents()) or bos is None:
        return None
    return int(bos.contents())


def text_chunks(loaded, tokens: np.ndarray, seq_len: int, chunks: int | None = None) -> np.ndarray:
    """Consecutive ``seq_len``-token chunks of ``tokens`` (at most ``chunks``), BOS first where the model
    wants one."""
    n = len(tokens) // seq_len
    if chunks:
        n = min(n, chunks)
    if n < 1:
        raise CoaloraError(f"the importance data has {len(tokens)} tokens, fewer than one chunk of {seq_len}")
    ids = np.array(tokens[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
    bos = _add_bos(loaded)
    if bos is not None:
        ids[:, 0] = int(bos)
    return ids


def data_windows(loaded, paths, seq_len: int, chunks: int | None = None,
                 data_format: str = "auto") -> tuple[np.ndarray, np.ndarray | None]:
    """Token windows of data files (text, or chat / instruction / text records as ``coalora train`` reads
    them) and, for records, which positions are tokens rather than padding."""
    from toolkit.records import build_windows, is_record_file
    from toolkit.text_data import tokenize_files

    if data_format == "auto" and not any(is_record_file(p) for p in paths):
        return text_chunks(loaded, tokenize_files(loaded.tokenizer, paths), seq_len, chunks), None
    w = build_windows(loaded.tokenizer, loaded.gguf.chat_template(), paths, seq_len, data_format)
    ids = w.ids[:chunks] if chunks else w.ids
    return ids, unpadded(ids, loaded.tokenizer)


def unpadded(ids: np.ndarray, tokenizer) -> np.ndarray:
    """True up to the last token that is not padding (records are padded at the end)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    real = ids != pad
    last = np.where(real.any(1), ids.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
    return np.arange(ids.shape[1])[None, :] < last[:, None]


def collected_names(loaded, process_output: bool = False) -> list[str]:
    """The weight matrices llama-imatrix collects: the blocks' (and the output head's)."""
    names = loaded.gguf.quantizable_names(True)
    return [n for n in names if n.startswith("blk.") or (process_output and n == "output.weight")]


@torch.no_grad()
def compute(loaded, ids: np.ndarray, valid: np.ndarray | None = None, device="cpu", batch: int = 4,
            process_output: bool = False, datasets=(), progress: bool = True) -> Imatrix:
    """The importance matrix of ``loaded``'s float model over the windows ``ids`` (N, L)."""
    model = loaded.model
    names = collected_names(loaded, process_output)
    if not names:
        raise CoaloraError("the model has no block weight matrices to collect importance for")
    dev = torch.device(device)
    sums = {n: torch.zeros(loaded.gguf.shape(n)[-1], dtype=torch.float64, device=dev) for n in names}
    counts = dict.fromkeys(names, 0)
    current: dict = {}

    def hook(name):
        def pre(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            keep = current.get("valid")
            if keep is not None:
                x = x[keep]
            sums[name] += x.double().square().sum(0)
            counts[name] += int(x.shape[0])
        return pre

    handles = []
    for n in names:
        module = model.get_submodule(loaded.hf_name(n).removesuffix(".weight"))
        handles.append(module.register_forward_pre_hook(hook(n)))
    home = next(model.parameters()).device
    model.to(dev)
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids), desc="imatrix", unit="chunk", leave=False)
    try:
        for i in range(0, len(ids), batch):
            b = torch.from_numpy(np.ascontiguousarray(ids[i:i + batch])).to(dev)
            current["valid"] = None if valid is None else torch.from_numpy(valid[i:i + batch]).to(dev).reshape(-1)
            model(b)
            if bar is not None:
                bar.update(len(b))
    finally:
        for h in handles:
            h.remove()
        model.to(home)
        model.train(was_training)
        if bar is not None:
            bar.close()
    if any(c == 0 for c in counts.values()):
        raise CoaloraError("no tokens reached the model's weights: the importance data is empty")
    return Imatrix({n: sums[n].float().cpu().numpy()[None, :] for n in names},
                   {n: np.array([float(counts[n])]) for n in names},
                   datasets=[str(Path(d)) for d in datasets], chunk_count=len(ids), chunk_size=int(ids.shape[1]))
