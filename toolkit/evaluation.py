"""The one evaluation protocol coalora uses everywhere (training reports, search, emit, validate).

Protocol:
- The held-out text is tokenized ONCE, as a whole, without special tokens.
- It is cut into ``n_windows`` consecutive, non-overlapping windows of ``n_ctx`` tokens, from the start.
- BOS: none by default. Windows are slices from the middle of a text, so a BOS would be a lie about
  where they start; SmolLM2's GGUF says ``add_bos_token = false`` too. When a model does want BOS
  (``bos`` given, see ``model_bos``), each window is ``[bos] + n_ctx-1`` text tokens instead.
  Either way torch and llama.cpp see exactly the same token ids.
- Scored: tokens 1..n_ctx-1 of each window, each given its prefix in the window (token 0 is context
  only), so every window contributes n_ctx-1 scores. NLLs use a float64 log-softmax.
- perplexity = exp(mean NLL) over all scored tokens of all windows.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np

from converters.errors import CoaloraError

N_WINDOWS = 32
N_CTX = 512


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, from a Hugging Face tokenizer or a llama_cpp.Llama."""
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "n_vocab"):  # llama_cpp.Llama
        return list(tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def model_bos(tokenizer) -> int | None:
    """The BOS id to put in front of each window when the model asks for one (add_bos), else None."""
    if hasattr(tokenizer, "n_vocab"):  # llama_cpp.Llama: the GGUF's tokenizer.ggml.add_bos_token
        add = str(tokenizer.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        return tokenizer.token_bos() if add else None
    add = getattr(tokenizer, "add_bos_token", False)
    return tokenizer.bos_token_id if add and tokenizer.bos_token_id is not None else None


def eval_windows(tokenizer, text: str, n_windows: int = N_WINDOWS, n_ctx: int = N_CTX,
                 bos: int | None = None) -> list[list[int]]:
    """``n_windows`` consecutive non-overlapping windows of ``n_ctx`` tokens of ``text``."""
    if n_windows < 1 or n_ctx < 2:
        raise CoaloraError(f"evaluation needs at least 1 window of 2 tokens (got {n_windows} x {n_ctx})")
    ids = tokenize(tokenizer, text)
    step = n_ctx - (1 if bos is not None else 0)
    if len(ids) < n_windows * step:
        raise CoaloraError(f"evaluation text has {len(ids)} tokens; {n_windows} windows of {n_ctx} need "
                           f"{n_windows * step}")
    prefix = [bos] if bos is not None else []
    return [prefix + ids[i * step:(i + 1) * step] for i in range(n_windows)]


def windows_digest(windows: Sequence[Sequence[int]]) -> str:
    """sha256 of the token ids, so two tools can check they scored the same tokens."""
    return hashlib.sha256(np.asarray(windows, dtype=np.int64).tobytes()).hexdigest()


def nll_from_logits(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """NLL of tokens[1:] given logits [T, V] of the window (row t predicts token t+1), float64."""
    import torch

    logp = _log_softmax64(np.asarray(logits)[:-1])
    tgt = torch.as_tensor(np.asarray(tokens[1:], dtype=np.int64))
    return (-logp.gather(-1, tgt[:, None]).squeeze(-1)).numpy()


def torch_window_nll(logits_fn: Callable, windows: Sequence[Sequence[int]], batch_size: int = 4) -> np.ndarray:
    """Per-token NLL [n_windows, n_ctx-1]; ``logits_fn`` maps a LongTensor [B, T] to logits [B, T, V]."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[i:i + batch_size], dtype=torch.long)
            logits = logits_fn(ids).to(torch.float64)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.append(nll.cpu().numpy())
    return np.concatenate(out, axis=0)


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def masked_perplexity(nlls: Sequence[np.ndarray], masks: Sequence[Sequence[bool]]) -> float:
    """Perplexity over the target tokens only: ``nlls[i][t]`` is the NLL of token t+1 of window i, counted
    where ``masks[i][t+1]`` (the answer tokens of a chat record)."""
    total = count = 0.0
    for nll, m in zip(nlls, masks):
        w = np.asarray(m[1:len(nll) + 1], dtype=bool)
        total += float(np.asarray(nll, dtype=np.float64)[w].sum())
        count += int(w.sum())
    return float(np.exp(total / max(count, 1)))


def records_digest(windows, masks) -> str:
    """sha256 of variable-length windows and their target masks."""
    h = hashlib.sha256()
    for w, m in zip(windows, masks):
        h.update(np.asarray(w, dtype=np.int64).tobytes() + np.asarray(m, dtype=bool).tobytes() + b"|")
    return h.hexdigest()


def _log_softmax64(logits):
    """log-softmax over the vocabulary in float64, as a torch tensor (torch's kernel: many times numpy's speed
    on a 512 x 49k window)."""
    import torch

    return torch.log_softmax(torch.as_tensor(np.asarray(logits)).to(torch.float64), dim=-1)


def kl_divergence(ref_logits, logits) -> np.ndarray:
    """Per-position KL(ref || other) in nats between two logit streams [..., V] (as llama-perplexity --kl-divergence)."""
    p, q = _log_softmax64(ref_logits), _log_softmax64(logits)
    return (p.exp() * (p - q)).sum(dim=-1).numpy()


def top1_agreement(ref_logits, logits) -> float:
    """Fraction of positions where both streams put the same token first."""
    a = np.asarray(ref_logits).argmax(axis=-1)
    b = np.asarray(logits).argmax(axis=-1)
    return float((a == b).mean())


class StreamComparison:
    """Accumulates KL and top-1 agreement window by window (scored positions: rows 0..T-2, or ``rows``)."""

    def __init__(self):
        self.kl: list[np.ndarray] = []
        self.same: list[np.ndarray] = []

    def add(self, ref_logits, logits, rows=None) -> None:
        sel = slice(0, -1) if rows is None else np.asarray(rows, dtype=bool)
        r, o = np.asarray(ref_logits)[sel], np.asarray(logits)[sel]
        self.kl.append(kl_divergence(r, o))
        self.same.append(r.argmax(-1) == o.argmax(-1))

    def summary(self) -> dict:
        kl = np.concatenate(self.kl)
        return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                "top1_agreement": float(np.concatenate(self.same).mean()), "positions": int(len(kl))}
