"""A training run folder: what was trained, on which model, and everything derived from it.

RUN/run.json       options, model path and sha256, model layout, status and training statistics
RUN/checkpoint.safetensors  LoRA + configuration-aware model + optimizer state (latest step): tensors in
                   safetensors, everything else as JSON in its metadata; nothing is unpickled
                   (a checkpoint.pt of an older coalora is a pickle and is refused)
RUN/trainset.json  the training configuration set
RUN/archive.json   configurations evaluated by the search (bits, loss)
RUN/tokens.npy     the tokenized training text
RUN/imatrix.gguf   the importance matrix every quantization of the run uses (llama.cpp's format), if any
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from toolkit import assets, limits
from converters.configuration import Configuration, ModelLayout
from converters.errors import CoaloraError
from converters.fileio import atomic_path, model_fingerprint, read_json, write_json


SHA256 = re.compile(r"[0-9a-f]{64}")


def quant_cache_dir(model_sha256: str) -> Path:
    """``$COALORA_HOME/quant-cache/<first 16 hex digits>``: only a real sha256 names a folder there."""
    if not isinstance(model_sha256, str) or not SHA256.fullmatch(model_sha256):
        raise CoaloraError("model_sha256 is not a sha256 (64 hex digits)")
    return assets.home() / "quant-cache" / model_sha256[:16]


def _problem(meta) -> str | None:
    """What is wrong with a run.json's content (None: usable), before any field is used."""
    from converters.quant_types import CATALOGUE_NAMES, IMATRIX_NAMES

    def strs(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    if not isinstance(meta, dict):
        return "run.json is not a JSON object"
    for key, ok in (("status", lambda v: v in ("training", "trained")), ("model", lambda v: isinstance(v, str) and v),
                    ("model_sha256", lambda v: isinstance(v, str) and SHA256.fullmatch(v)),
                    ("options", lambda v: isinstance(v, dict)), ("layout", lambda v: isinstance(v, dict)),
                    ("step", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**7)):
        if key not in meta:
            return f"run.json lacks {key!r}"
        if not ok(meta[key]):
            return f"run.json: {key} has a wrong type or value"
    o = meta["options"]
    if o.get("mode") not in ("coa", "shared", "single"):
        return "run.json: options.mode must be coa, shared or single"
    for key, limit in limits.TRAIN.items():
        if key in o and limit.check(o[key]) is not None:
            return f"run.json: options.{key} {limit.check(o[key])}"
    for key in ("rank", "alpha", "seed", "seq_len", "calib_windows"):
        if key not in o:
            return f"run.json: options lack {key!r}"
    if not strs(o.get("targets", [])) or not strs(o.get("type_deltas", [])):
        return "run.json: options.targets and options.type_deltas must be lists of tensor kinds / quant types"
    lay = meta["layout"]
    rows = lay.get("tensors")
    if not (isinstance(rows, list) and rows and all(
            isinstance(r, list) and len(r) == 5 and isinstance(r[0], str) and isinstance(r[3], str)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in (r[1], r[2], r[4]))
            and 1 <= r[1] <= 1 << 24 and 1 <= r[2] <= 1 << 24 and -1 <= r[4] < 1 << 16 for r in rows)):
        return "run.json: layout.tensors must list [name, rows, columns, kind, block] of each tensor"
    if len({r[0] for r in rows}) != len(rows):
        return "run.json: layout.tensors names a tensor twice"
    for key in ("fixed_bytes", "n_blocks"):
        v = lay.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 50:
            return f"run.json: layout.{key} must be a non-negative integer"
    menu = lay.get("menu")
    if not strs(menu) or not menu or any(q not in CATALOGUE_NAMES + IMATRIX_NAMES for q in menu):
        return "run.json: layout.menu must list known quant types"
    emb = lay.get("embedding_menu", [])
    if not strs(emb) or any(q not in CATALOGUE_NAMES for q in emb):
        return "run.json: layout.embedding_menu must list known quant types"
    hp = lay.get("hparams") or {}
    if not isinstance(hp, dict) or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                       or v < 0 for v in hp.values()):
        return "run.json: layout.hparams must map names to non-negative numbers"
    if not strs(meta.get("data", [])) or not isinstance(meta.get("data_sha256", {}), dict):
        return "run.json: data must list files and data_sha256 map them to digests"
    return None


# Held-out windows per forward pass of calibration_loss.
CALIBRATION_BATCH = 8


class Run:
    def __init__(self, path: Path, meta: dict, loaded=None):
        self.path = Path(path)
        self.meta = meta
        self._loaded = loaded
        self.device = torch.device("cpu")  # where model() computes; set before the first model() call
        self._calibration: dict = {}  # calibration_loss's per-window losses: (configuration, checkpoint state, span)
        self._divergence: dict = {}  # calibration_divergence's per-window KL, keyed the same way

    # -- files --------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.safetensors"

    @property
    def trainset_path(self) -> Path:
        return self.path / "trainset.json"

    @property
    def archive_path(self) -> Path:
        return self.path / "archive.json"

    @classmethod
    def open(cls, path, require_trained: bool = True) -> "Run":
        path = Path(path)
        meta_path = path / "run.json"
        if not meta_path.exists():
            raise CoaloraError(f"{path} is not a coalora run (no run.json); create one with `coalora train`")
        meta = read_json(meta_path)
        problem = _problem(meta)
        if problem:
            raise CoaloraError(f"run {path} is damaged: {problem}")
        run = cls(path, meta)
        if (path / LEGACY_CHECKPOINT).exists() and not run.checkpoint_path.exists():
            raise CoaloraError(f"run {path} has a {LEGACY_CHECKPOINT} from an older coalora: a pickle, which could run "
                               f"code when loaded, so coalora no longer reads it; train the run again")
        meta = run.meta
        if require_trained and meta.get("status") != "trained":
            raise CoaloraError(f"run {path} has no trained model yet (status: {meta.get('status', 'unknown')}); "
                               f"finish it with `coalora train ... --resume`")
        return run

    def save_meta(self) -> None:
        write_json(self.meta_path, self.meta)

    # -- model ----------------------------------------------------------------------------------
    @functools.cached_property
    def layout(self) -> ModelLayout:
        return ModelLayout.from_description(self.meta["layout"])

    def loaded(self):
        """The Hugging Face model the run was trained on (loaded once)."""
        from converters.model_loading import load_model

        if self._loaded is None:
            model_path = Path(self.meta["model"])
            if not model_path.exists():
                raise CoaloraError(f"the run's model {model_path} is missing")
            loaded = load_model(model_path)
            _check_layout(self.layout, loaded.layout(include_embeddings=True), self.path)
            self._loaded = loaded
        return self._loaded

    def check_layout_with_model(self):
        """run.json's tensors against the model's shapes, read from the model's GGUF header (no weights loaded):
        a search needs only the run folder, but where the model is at hand a damaged layout is refused before
        it is searched. Returns the opened GGUF source for the caller to reuse; None when the model is gone
        (nothing to check) or already loaded (checked then)."""
        from converters.gguf_source import open_source

        model_path = Path(self.meta["model"])
        if self._loaded is not None or not model_path.exists():
            return None
        source = open_source(model_path)
        _check_layout(self.layout, source.layout(include_embeddings=True), self.path)
        return source

    def check_model(self, model_path) -> None:
        """Refuse a model other than the one this run was trained on."""
        if model_fingerprint(model_path) != self.meta["model_sha256"]:
            raise CoaloraError(f"{model_path} is not the model run {self.path} was trained on "
                               f"({self.meta['model']})")

    @property
    def imatrix_path(self) -> Path:
        return self.path / IMATRIX_FILE

    @functools.cache
    def imatrix(self):
        """The run's importance matrix (checked against the sha256 it was trained with), or None."""
        digest = self.meta.get("imatrix_sha256")
        if not digest:
            return None
        from converters import imatrix as imx

        im = imx.load(self.imatrix_path)
        if im.sha256 != digest:
            raise CoaloraError(f"run {self.path}: {IMATRIX_FILE} changed since the run was trained "
                               f"(sha256 {im.sha256[:16]}, the run's {digest[:16]})")
        return im

    @functools.cache
    def bank(self):
        from toolkit.weight_bank import WeightBank

        return WeightBank(self.loaded(), quant_cache_dir(self.meta["model_sha256"]), imatrix=self.imatrix(),
                          threads=env_threads())

    def quantized_bytes(self, name: str, qtype) -> np.ndarray:
        return self.bank().quantized_bytes(name, qtype)

    @functools.cache
    def model(self):
        """The CoA-LoRA torch model (one per run: it wraps the loaded model in place), latest checkpoint loaded."""
        from toolkit.coa_lora import CoALoRAModel

        o = self.meta["options"]
        try:
            m = CoALoRAModel(self.loaded(), self.bank(), self.layout, mode=o["mode"], rank=o["rank"],
                             alpha=o["alpha"], targets=tuple(o.get("targets", ())), seed=o["seed"],
                             type_deltas=tuple(o.get("type_deltas", ())))
        except (ValueError, KeyError, IndexError) as e:
            raise CoaloraError(f"run {self.path}: its options do not fit its model ({type(e).__name__})") from None
        if self.checkpoint_path.exists():
            try:
                m.load_lora_state(load_checkpoint(self.checkpoint_path)["lora"])
            except ValueError:
                raise CoaloraError(f"checkpoint {self.checkpoint_path} does not match run.json's options "
                                   f"(rank, targets, mode)") from None
        elif self.meta.get("status") == "trained":  # never an untrained adapter in a trained run's name
            raise CoaloraError(f"run {self.path} is marked trained but its {self.checkpoint_path.name} is missing")
        m.to_device(self.device)
        m.eval()
        return m

    def trainset(self) -> list[Configuration]:
        if not self.trainset_path.exists():
            return []
        rows = read_json(self.trainset_path)
        if not isinstance(rows, list):
            raise CoaloraError(f"{self.trainset_path} is not a list of configurations")
        cfgs = [Configuration.from_json(d) for d in rows]
        for c in cfgs:
            self.layout.validate(c, strict_menu=False)
        return cfgs

    def check_configuration(self, cfg: Configuration) -> None:
        """A CoA run answers for the types it was trained on; other modes' adapters ignore the configuration."""
        self.layout.validate(cfg, strict_menu=self.meta["options"]["mode"] == "coa")

    # -- products -------------------------------------------------------------------------------
    def has_adjustments(self) -> bool:
        """Whether this run's adapter depends on the configuration (else generated and shared LoRA are one)."""
        return self.model().has_adjustments

    def adapter_tensors(self, cfg: Configuration, adjusted: bool = True) -> dict:
        """The adapter's LoRA pairs for ``cfg``: generated for it (``adjusted``) or the shared LoRA alone."""
        self.check_configuration(cfg)
        return self.model().adapter_tensors(cfg, adjusted)

    def write_adapter(self, cfg: Configuration, path, fmt: str = "gguf", adjusted: bool = True) -> int:
        tensors = self.adapter_tensors(cfg, adjusted)
        o = self.meta["options"]
        if fmt == "peft":
            from converters.peft_adapter_writer import write_peft
            return write_peft(path, self.loaded(), tensors, rank=o["rank"], alpha=o["alpha"])
        from converters.gguf_adapter_writer import write_lora_gguf
        return write_lora_gguf(path, self.loaded().arch, o["alpha"], tensors,
                               name=f"coalora {o['mode']} adapter",
                               extra={"coalora.model_sha256": self.meta["model_sha256"],
                                      "coalora.mode": o["mode"],
                                      "coalora.adapter": "generated" if adjusted else "shared"})

    def torch_logits_fn(self, cfg: Configuration, adjusted: bool = True):
        self.check_configuration(cfg)
        model = self.model()

        @torch.no_grad()
        def logits(ids: torch.Tensor) -> torch.Tensor:
            model.set_configuration(cfg)
            with model.variant(adjusted):
                return model(ids.to(self.device)).logits.cpu()

        return logits

    @torch.no_grad()
    def calibration_loss(self, cfgs: list[Configuration], n_windows: int | None = None,
                         per_window: bool = False, adjusted: bool = True, divergence: bool = True) -> list:
        """Mean token loss of each configuration's adapter on held-out windows of the training text
        (the first ``n_windows`` of them; default the run's ``calib_windows``), 8 windows per forward pass.
        ``per_window``: an array of each window's mean loss per configuration instead (for paired comparisons).
        ``adjusted`` False: with the shared LoRA alone instead of the generated adapter. Each forward pass of
        each configuration is measured once per checkpoint: emit's confirmations for several profiles share
        candidates, and a measurement on more windows (the confirmation's extension) only measures the windows
        it adds. The passes are those of a measurement from scratch (windows 0-7, 8-15, ..., then the rest), so
        the losses do not depend on what was measured before. ``divergence`` False: without the unquantized
        model's pass that :meth:`calibration_divergence` needs (training's search rounds rank by loss alone)."""
        out = [np.concatenate(w) for w in self._calibrated(cfgs, n_windows, adjusted, self._calibration,
                                                           divergence)]
        return out if per_window else [float(w.mean()) for w in out]

    @torch.no_grad()
    def calibration_divergence(self, cfgs: list[Configuration], n_windows: int | None = None,
                               adjusted: bool = False) -> list:
        """Per configuration, each held-out window's mean KL divergence (nats per token) of the model with the
        shared LoRA (``adjusted``: with the configuration's generated adapter) from the unquantized (F32) model
        with the shared LoRA, the full-precision fine-tune: how far the file's bytes and their adapter move the
        model, whatever the text's fit. Measured in the same passes as ``calibration_loss`` and cached like it."""
        return [np.concatenate(w) for w in self._calibrated(cfgs, n_windows, adjusted, self._divergence)]

    def _calibrated(self, cfgs, n_windows, adjusted: bool, cache: dict, divergence: bool = True) -> list:
        """Per configuration, the per-span arrays of ``cache`` (losses or divergences), measuring the missing
        (``divergence``: a span measured without its divergence is missing too)."""
        from toolkit.training import calibration_stream

        state = self._checkpoint_state(), str(self.device), adjusted
        k = len(calibration_stream(self).labelled_calibration(n_windows)[0])
        spans = [(s, min(CALIBRATION_BATCH, k - s)) for s in range(0, k, CALIBRATION_BATCH)]

        def absent(key) -> bool:
            return key not in cache or (divergence and self._divergence.get(key) is None)

        todo = list(dict.fromkeys(c for c in cfgs for sp in spans if absent((c, state, sp))))
        missing = [sp for sp in spans if any(absent((c, state, sp)) for c in todo)]
        measured = self._measure_calibration(todo, missing, adjusted, divergence) if todo else []
        for cfg, (losses, kls) in zip(todo, measured):
            for sp, w, kl in zip(missing, losses, kls):
                self._calibration[cfg, state, sp] = w
                if kl is not None or (cfg, state, sp) not in self._divergence:  # keep one measured before
                    self._divergence[cfg, state, sp] = kl
        return [[cache[c, state, sp] for sp in spans] for c in cfgs]

    def forget_measurements(self) -> None:
        """Drop :meth:`calibration_loss`'s cached measurements (a benchmark that times measuring)."""
        self._calibration.clear()
        self._divergence.clear()

    def _checkpoint_state(self):
        """What identifies the checkpoint on disk (training rewrites it by rename between rounds)."""
        try:
            st = self.checkpoint_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _measure_calibration(self, cfgs: list[Configuration], spans: list[tuple[int, int]], adjusted: bool,
                             divergence: bool = True) -> list:
        """Per configuration, (the per-window losses of each span (first window, count) of the held-out windows,
        one forward pass per span, with the shared LoRA or, ``adjusted``, the generated adapter; and each window's
        KL divergence from the F32 model with the shared LoRA, or None per span without ``divergence``)."""
        if not cfgs or not spans:
            return [([], []) for _ in cfgs]
        from torch.nn import functional as F

        from toolkit.training import calibration_stream

        model = self.model()
        end = max(s + n for s, n in spans)
        batch, labels = (t.to(self.device) for t in calibration_stream(self).labelled_calibration(end))
        reference = self.layout.uniform("F32")
        out = [([], []) for _ in cfgs]

        def per_window(v: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
            if bool(valid.all()):  # running text: every position
                return v.mean(1).cpu().double().numpy()
            return ((v * valid).sum(1) / valid.sum(1).clamp(min=1)).cpu().double().numpy()  # records: targets

        current = []  # the configuration set last in this measurement: re-pointing every tensor has a cost

        def log_probs(cfg: Configuration, s: int, n: int, adjust: bool) -> torch.Tensor:
            if current != [cfg]:
                model.set_configuration(cfg)
                current[:] = [cfg]
            with model.variant(adjust):
                return F.log_softmax(model(batch[s:s + n]).logits[:, :-1].float(), dim=-1)

        # span by span, so that the reference's log-probabilities are held for one span only
        for s, n in spans:
            ref = log_probs(reference, s, n, False) if divergence else None
            target = labels[s:s + n, 1:]
            valid = target != -100
            for i in range(len(cfgs)):
                lp = log_probs(cfgs[i], s, n, adjusted)
                out[i][0].append(per_window(-lp.gather(-1, target.clamp(min=0)[..., None])[..., 0], valid))
                out[i][1].append(None if ref is None else per_window(torch.stack(  # window by window: smaller
                    [(r.exp() * (r - q)).sum(-1) for r, q in zip(ref, lp)]), valid))  # temporaries
        return out


LEGACY_CHECKPOINT = "checkpoint.pt"
IMATRIX_FILE = "imatrix.gguf"


def _check_layout(layout: ModelLayout, model_layout: ModelLayout, path) -> None:
    """run.json's tensors must be the model's (names and shapes), never a layout the model does not have."""
    have = {t.name: (t.n_rows, t.n_per_row) for t in model_layout.tensors}
    for t in layout.tensors:
        if have.get(t.name) != (t.n_rows, t.n_per_row):
            raise CoaloraError(f"run {path}: run.json's tensor {t.name[:80]!r} is not in the model as described")


def save_checkpoint(path: Path, state: dict) -> None:
    """``state``: {"lora": {name: tensor}, "optim": an optimizer state_dict, and JSON-able scalars}."""
    from safetensors.torch import save_file

    tensors = {f"lora/{k}": v.detach().cpu().contiguous().clone() for k, v in state["lora"].items()}
    optim = state.get("optim") or {"state": {}, "param_groups": []}
    scalars = {}
    for pid, entry in optim["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}/{k}"] = v
    meta = {k: v for k, v in state.items() if k not in ("lora", "optim")}
    meta.update(optim_param_groups=optim["param_groups"], optim_scalars=scalars, format="coalora-checkpoint-1")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"coalora": json.dumps(meta)})


def load_checkpoint(path: Path) -> dict:
    """The state :func:`save_checkpoint` wrote (tensors read with safetensors; no code is ever unpickled)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("coalora", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CoaloraError(f"checkpoint {path} is missing") from None
    except Exception as e:  # safetensors raises its own errors for a damaged file
        raise CoaloraError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                           f"delete it to train from scratch") from None
    if not isinstance(meta, dict) or meta.get("format") != "coalora-checkpoint-1" or "step" not in meta:
        raise CoaloraError(f"checkpoint {path} is not a coalora checkpoint")
    lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora/")}
    bad = [k for k, v in lora.items() if not torch.isfinite(v).all()]
    if bad:
        raise CoaloraError(f"checkpoint {path}: {bad[0]} holds NaN or Inf values")
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in (meta.get("optim_scalars") or {}).items():
        pid, name = k.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    rest = {k: v for k, v in meta.items() if k not in ("optim_param_groups", "optim_scalars", "format")}
    return {**rest, "lora": lora, "optim": {"state": state, "param_groups": meta.get("optim_param_groups", [])}}


def env_threads() -> int:
    return int(os.environ.get("COALORA_THREADS", torch.get_num_threads()))


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; or an explicit ``cpu`` / ``cuda[:N]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CoaloraError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CoaloraError(f"device {name} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise CoaloraError(f"device {name}: only cpu and cuda are supported")
    return dev
