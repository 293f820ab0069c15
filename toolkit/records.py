"""Training data as records: chat, instruction and text records from JSONL, JSON, Parquet or CSV files.

Files are read with Hugging Face ``datasets`` from local paths (memory-mapped Arrow; nothing from a hub).
A file's format comes from its columns: ``messages`` (chat), ``prompt`` + ``completion`` (instruction),
``text``; ``--data-format`` overrides. Chat and instruction records are rendered with the model's own chat
template (the GGUF's ``tokenizer.chat_template``, what llama-server applies) and the loss falls only on the
assistant's turns (template tokens of the turn included, so the model learns to end it); text records are
trained on every token. Each record fills its own window(s) of ``seq_len`` tokens, padded: no window mixes
two records, so nothing leaks across a record boundary. A chat record longer than a window is truncated
(counted); a text record is cut into consecutive windows.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.errors import CoaloraError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
FORMATS = ("auto", "chat", "instruction", "text")
ROLES = ("system", "user", "assistant")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SHOWN = 80  # characters of the input an error message quotes at most


def is_record_file(path) -> bool:
    return Path(path).suffix.lower() in RECORD_SUFFIXES


@dataclass
class DataSummary:
    format: str
    records: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Windows:
    """``ids`` (N, L) token ids padded with ``pad``; ``mask`` (N, L) True where the token is a training target;
    ``record`` (N,) the index of the record each window came from."""
    ids: np.ndarray
    mask: np.ndarray
    record: np.ndarray
    summary: DataSummary


def _short(x) -> str:
    s = str(x)
    return s if len(s) <= _SHOWN else s[:_SHOWN] + "..."


# ---- reading ---------------------------------------------------------------------------------
def _check_json_lines(path: Path) -> None:
    """datasets reports a bad line without its number: check every line first, streaming."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as e:
                        raise CoaloraError(f"{path}: line {n}: invalid JSON ({_short(e)})") from None
    except UnicodeDecodeError:
        raise CoaloraError(f"{path}: not UTF-8 text") from None


def read_records(path):
    """The records of a file as a ``datasets.Dataset`` (memory-mapped Arrow; iterating yields dicts)."""
    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise CoaloraError(f"{path}: empty file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _check_json_lines(path)
    elif suffix == ".json":
        try:
            top = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CoaloraError(f"{path}: invalid JSON ({_short(e)})") from None
        if not isinstance(top, (list, dict)):  # pyarrow's JSON reader crashes (SIGSEGV) on a bare `null`
            raise CoaloraError(f"{path}: a JSON data file holds a list of records or an object of columns, "
                               f"not {type(top).__name__}")
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(_BUILDERS[suffix], data_files=str(path.resolve()), split="train")
    except Exception as e:  # datasets / pyarrow raise many kinds for files they cannot read
        raise CoaloraError(f"{path}: cannot read as {suffix[1:]} records ({_short(e).splitlines()[0]})") from None
    if len(ds) == 0:
        raise CoaloraError(f"{path}: no records")
    return ds


def detect_format(path, columns) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if {"prompt", "completion"} <= cols:
        return "instruction"
    if "text" in cols:
        return "text"
    raise CoaloraError(f"{path}: no usable field (messages, prompt + completion, or text); "
                       f"columns: {_short(', '.join(sorted(map(str, cols))))}")


# ---- rendering -------------------------------------------------------------------------------
def _text(record: dict, where: str) -> str:
    t = record.get("text")
    if not isinstance(t, str) or not t:
        raise CoaloraError(f"{where}: text must be a non-empty string")
    return t



def _messages(record: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "instruction":
        p, c = record.get("prompt"), record.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise CoaloraError(f"{where}: prompt and completion must be strings")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise CoaloraError(f"{where}: messages must be a non-empty list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise CoaloraError(f"{where}: every message needs a role and a string content")
        if m.get("role") not in ROLES:
            raise CoaloraError(f"{where}: unknown role {_short(m.get('role'))!r}; known: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise CoaloraError(f"{where}: no assistant message to train on")
    return out


def render_chat(tokenizer, template: str, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn.

    The turn of message i spans the characters between the rendering of messages[:i] with the generation
    prompt and the rendering of messages[:i+1]; the template must render conversations prefix by prefix."""
    def text(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen)
        except Exception as e:  # jinja errors of the template on this conversation
            raise CoaloraError(f"{where}: the chat template fails on this record ({_short(e)})") from None

    full = text(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = text(messages[:i], True), text(messages[:i + 1], False)
        if not (end.startswith(start) and full.startswith(end)):
            raise CoaloraError(f"{where}: the chat template does not render this conversation turn by turn, "
                               f"so its assistant spans cannot be found")
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def check_records(paths, fmt: str = "auto") -> None:
    """Every record of the record files among ``paths`` has the fields its format needs (no tokenizer, so
    this runs before the model loads: a bad data file fails in a fraction of a second)."""
    if fmt not in FORMATS:
        raise CoaloraError(f"unknown data format {fmt!r}; choose from {', '.join(FORMATS)}")
    for path in map(Path, paths):
        if not is_record_file(path):
            continue
        rows = read_records(path)
        f = detect_format(path, rows.column_names) if fmt == "auto" else fmt
        for n, row in enumerate(rows, 1):
            where = f"{path}: record {n}"
            _text(row, where) if f == "text" else _messages(row, f, where)


def build_windows(tokenizer, template: str | None, paths, seq_len: int, fmt: str = "auto") -> Windows:
    """Every record of ``paths`` as padded windows of ``seq_len`` tokens with its loss mask."""
    if fmt not in FORMATS:
        raise CoaloraError(f"unknown data format {fmt!r}; choose from {', '.join(FORMATS)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    ids, mask, record = [], [], []
    formats, summary = set(), DataSummary("")
    for path in paths:
        path = Path(path)
        if is_record_file(path):
            rows = read_records(path)
            f = detect_format(path, rows.column_names) if fmt == "auto" else fmt
        else:  # a plain text file is one text record
            try:
                rows, f = [{"text": path.read_text(encoding="utf-8")}], "text"
            except (OSError, UnicodeDecodeError) as e:
                raise CoaloraError(f"cannot read training text {path}: {_short(e)}") from None
            if not rows[0]["text"].strip():
                raise CoaloraError(f"{path}: empty file")
        if f in ("chat", "instruction") and not template:
            raise CoaloraError(f"{path}: {f} data needs the model's chat template, and this model has none "
                               f"(tokenizer.chat_template)")
        formats.add(f)
        for n, row in enumerate(rows, 1):
            where = f"{path}: record {n}"
            index = summary.records
            summary.records += 1
            if f == "text":
                toks = list(tokenizer(_text(row, where), add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
                chunks = [toks[i:i + seq_len] for i in range(0, len(toks), seq_len)]
                chunks = [c for c in chunks if len(c) > 1]
                for c in chunks:
                    ids.append(c)
                    mask.append([True] * len(c))
                    record.append(index)
            else:
                toks, m = render_chat(tokenizer, template, _messages(row, f, where), where)
                if len(toks) > seq_len:
                    summary.truncated += 1
                    toks, m = toks[:seq_len], m[:seq_len]
                if not any(m[1:]):
                    continue  # nothing left to learn in this window (an answer past the truncation)
                ids.append(toks)
                mask.append(m)
                record.append(index)
    if not ids:
        raise CoaloraError("the data holds no trainable tokens")
    n = len(ids)
    out_ids = np.full((n, seq_len), pad, dtype=np.int64)
    out_mask = np.zeros((n, seq_len), dtype=bool)
    for i, (t, m) in enumerate(zip(ids, mask)):
        out_ids[i, :len(t)] = t
        out_mask[i, :len(m)] = m
    out_mask[:, 0] = False  # the first token of a window has nothing before it to be predicted from
    summary.format = "+".join(sorted(formats))
    summary.tokens = int(sum(len(t) for t in ids))
    summary.loss_tokens = int(out_mask.sum())
    return Windows(out_ids, out_mask, np.asarray(record, dtype=np.int64), summary)


# ---- evaluation with llama.cpp's tokenizer ----------------------------------------------------
def render_text(template: str, messages: list[dict], add_generation_prompt: bool, special: dict, where: str) -> str:
    """The chat template applied as transformers (and llama-server's jinja) apply it, without a tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        out = render_jinja_template([messages], chat_template=template, add_generation_prompt=add_generation_prompt,
                                    **special)
    except Exception as e:
        raise CoaloraError(f"{where}: the chat template fails on this record ({_short(e)})") from None
    return out[0][0] if isinstance(out, tuple) else out[0]


def eval_records(path, template: str | None, tokenize, n_windows: int, n_ctx: int, special: dict,
                 bos: int | None = None, fmt: str = "auto") -> tuple[list[list[int]], list[list[bool]], str]:
    """Up to ``n_windows`` evaluation windows of a record file, tokenized by ``tokenize`` (llama.cpp's vocabulary):
    (token ids, target mask, format). Chat / instruction records are scored on their assistant turns only,
    found by tokenizing the conversation turn by turn; text records on every token."""
    rows = read_records(path)
    f = detect_format(path, rows.column_names) if fmt == "auto" else fmt
    if f in ("chat", "instruction") and not template:
        raise CoaloraError(f"{path}: {f} data needs the model's chat template, and this model has none")
    windows, masks = [], []
    for n, row in enumerate(rows, 1):
        if len(windows) >= n_windows:
            break
        where = f"{path}: record {n}"
        if f == "text":
            toks, mask = tokenize(_text(row, where)), None
        else:
            msgs = _messages(row, f, where)
            toks = tokenize(render_text(template, msgs, False, special, where))
            mask = [False] * len(toks)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                a = tokenize(render_text(template, msgs[:i], True, special, where))
                b = tokenize(render_text(template, msgs[:i + 1], False, special, where))
                if toks[:len(a)] != a or toks[:len(b)] != b:
                    raise CoaloraError(f"{where}: the conversation does not tokenize turn by turn, so its "
                                       f"assistant tokens cannot be found")
                mask[len(a):len(b)] = [True] * (len(b) - len(a))
        if bos is not None and (not toks or toks[0] != bos):
            toks = [bos] + toks
            mask = None if mask is None else [False] + mask
        mask = [True] * len(toks) if mask is None else mask
        toks, mask = toks[:n_ctx], mask[:n_ctx]
        mask[0] = False
        if len(toks) > 1 and any(mask):
            windows.append(toks)
            masks.append(mask)
    if not windows:
        raise CoaloraError(f"{path}: no record with tokens to evaluate")
    return windows, masks, f
