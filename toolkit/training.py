"""Joint training of the shared LoRA and the configuration-aware model (CoA-LoRA), and the baselines.

mode "coa":    LoRA + configuration-aware model, configurations drawn from the training set,
               which the Pareto search refines between rounds.
mode "shared": one LoRA for all configurations of the training set, no configuration-aware model.
mode "single": one LoRA fine-tuned for one fixed configuration (the per-configuration baseline).
"""
from __future__ import annotations

import functools
from typing import Callable
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from converters.configuration import DEFAULT_EMBEDDING_MENU, DEFAULT_MENU, Configuration
from converters.errors import CoaloraError
from converters.fileio import atomic_path, model_fingerprint, sha256_file, write_json
from toolkit.run import Run, load_checkpoint, save_checkpoint
from toolkit.weight_bank import UNQUANTIZED
from toolkit.records import FORMATS, build_windows, check_records, is_record_file
from toolkit.text_data import RecordStream, TokenStream, tokenize_files


@dataclass
class TrainOptions:
    mode: str = "coa"
    rank: int = 8
    alpha: float = 16.0
    steps: int = 200
    seq_len: int = 256
    batch: int = 4
    lr: float = 1e-3
    cam_lr: float = 1e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    warmup: int = 10
    targets: tuple = ()  # tensor kinds with a LoRA; () = every block projection of the architecture
    menu: tuple = DEFAULT_MENU
    seed: int = 0
    rounds: int = 2
    search_candidates: int = 12
    checkpoint_every: int = 25
    calib_windows: int = 4
    include_embeddings: bool = True
    embedding_menu: tuple = DEFAULT_EMBEDDING_MENU  # types the embedding and head may take besides the menu
    top_share: float = 0.0  # share of steps on the training set's highest-precision configuration
    low_share: float = 0.0  # share of steps drawn from the lower-bpw half of the training set
    configs_per_step: int = 1  # configurations per optimizer step (coa / shared)
    config_batch: str = "split"  # "split": they share the batch's sequences; "full": each sees the whole batch
    device: str = "auto"  # where torch trains: auto (CUDA if present), cpu, cuda[:N]
    init_lora: str = ""  # run folder whose trained LoRA starts this run (same model, rank and targets)
    anchor: str = ""  # quant type of a uniform anchor configuration trained on every step's whole batch
    anchor_loss: str = "kl"  # the sampled configurations' loss with an anchor: "kl" to its output, or "ce"
    anchor_lora_weight: float = 1.0  # with an anchor: weight of the sampled configurations' gradient on the LoRA
    type_deltas: tuple = ()  # coa: quant types that get, per tensor, a trained correction of A and B
    delta_lr: float = 0.0  # learning rate of those corrections (0: lr)
    delta_error_power: float = 0.5  # a correction's scale: (its type's quantization error / Q4_0's) ** power
    data_format: str = "auto"  # record files: auto (from their fields), chat, instruction or text
    eval_data: tuple = ()  # files whose records are the held-out part (default: the tail of the training records)
    weights_dtype: str = "auto"  # dequantized weights torch computes with: auto, float32, bfloat16, float16
    weights_limit_gib: float = 8.0  # auto: bfloat16 on a GPU when the float32 weights are larger than this
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    imatrix: str = "train"  # importance matrix: "train" (computed from the training data), "" (none), or a file
    imatrix_chunks: int = 64  # with "train": at most this many training windows

    def pick(self, trainset: list, bpw, step: int, part: int = 0):
        """The configuration of one step (of its ``part``-th share of the batch): with probability
        ``top_share`` the highest-bpw one, with probability ``low_share`` one of the lower-bpw half (the
        ceil(n/2) configurations of fewest bits per weight), else uniform over the training set."""
        g = torch.Generator().manual_seed(self.seed * 7919 + step + 1_000_003 * part)
        u = float(torch.rand((), generator=g)) if self.top_share > 0 or self.low_share > 0 else 1.0
        if u < self.top_share:
            return max(trainset, key=bpw)
        if u < self.top_share + self.low_share:
            low = sorted(trainset, key=bpw)[:(len(trainset) + 1) // 2]
            return low[int(torch.randint(len(low), (1,), generator=g))]
        return trainset[int(torch.randint(len(trainset), (1,), generator=g))]

    def lr_at(self, step: int, base: float) -> float:
        if step < self.warmup:
            return base * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# Options that must not change when a run is resumed.
_FROZEN = ("mode", "rank", "alpha", "seq_len", "batch", "lr", "cam_lr", "weight_decay", "clip", "warmup",
           "targets", "menu", "seed", "rounds", "include_embeddings", "embedding_menu", "top_share", "low_share", "configs_per_step",
           "config_batch", "init_lora", "anchor", "anchor_loss", "anchor_lora_weight", "type_deltas",
           "delta_lr", "delta_error_power")


WINDOWS_FILE = "windows.npz"  # record data: ids, mask, record (+ calib_ids, calib_mask with --eval-data)


def _read_token_file(path: str) -> dict[str, np.ndarray]:
    """The arrays of a run's token file, checked for shape and dtype before any use."""
    def damaged(why: str) -> CoaloraError:
        return CoaloraError(f"{Path(path).name} of the run is damaged ({why}); train the run again")

    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = {"tokens": np.load(path, allow_pickle=False)}
    except Exception as e:  # numpy raises ValueError, EOFError, SyntaxError, tokenize errors, BadZipFile ... here
        raise damaged(type(e).__name__) from None
    shapes = {"tokens": 1, "ids": 2, "mask": 2, "record": 1, "calib_ids": 2, "calib_mask": 2}
    need = {"tokens"} if "tokens" in arrays else {"ids", "mask", "record"}
    bad = [k for k in arrays if k not in shapes or arrays[k].ndim != shapes[k]
           or arrays[k].dtype.kind not in ("b" if k.endswith("mask") else "iu")]
    if bad or not need <= arrays.keys() or ("calib_ids" in arrays) != ("calib_mask" in arrays):
        raise damaged(f"arrays {sorted(arrays)[:6]}")
    for ids, mask in (("ids", "mask"), ("calib_ids", "calib_mask")):
        if ids in arrays and arrays[ids].shape != arrays[mask].shape:
            raise damaged(f"{ids} and {mask} differ in shape")
    if "record" in arrays and len(arrays["record"]) != len(arrays["ids"]):
        raise damaged("one record index per window expected")
    return arrays


@functools.cache
def _stream_for(path: str, seq_len: int, calib_windows: int, vocab: int) -> TokenStream | RecordStream:
    z = _read_token_file(path)
    for k in ("tokens", "ids", "calib_ids"):
        if k in z and z[k].size and (int(z[k].min()) < 0 or int(z[k].max()) >= vocab):
            raise CoaloraError(f"{Path(path).name} of the run is damaged (token ids outside the model's "
                               f"vocabulary of {vocab}); train the run again")
    if "tokens" in z:
        return TokenStream(z["tokens"].astype(np.int64), seq_len, calib_windows=calib_windows)
    calib = (z["calib_ids"], z["calib_mask"]) if "calib_ids" in z else None
    return RecordStream(z["ids"], z["mask"], z["record"], calib_windows=calib_windows, calib=calib)


def calibration_stream(run: Run) -> TokenStream | RecordStream:
    o = run.meta["options"]
    records = run.path / WINDOWS_FILE
    path = records if records.exists() else run.path / "tokens.npy"
    vocab = run.loaded().model.get_input_embeddings().num_embeddings
    return _stream_for(str(path), o["seq_len"], o["calib_windows"], vocab)


def _prepare_data(run_dir: Path, loaded, data_paths, opts: "TrainOptions") -> tuple[dict, Callable[[], None]]:
    """Tokenize the training data (checked before any folder exists); returns its summary and a function
    that saves it into the run folder."""
    if opts.data_format not in FORMATS:
        raise CoaloraError(f"--data-format {opts.data_format!r}: choose from {', '.join(FORMATS)}")
    if opts.data_format == "auto" and not opts.eval_data and not any(is_record_file(p) for p in data_paths):
        tokens = tokenize_files(loaded.tokenizer, data_paths)  # running text, as the demo trains
        TokenStream(tokens, opts.seq_len, calib_windows=opts.calib_windows)  # validates length
        summary = {"format": "text", "records": len(data_paths), "tokens": int(len(tokens)),
                   "loss_tokens": int(len(tokens)), "truncated": 0}
        return summary, lambda: np.save(run_dir / "tokens.npy", tokens)
    template = loaded.gguf.chat_template()
    w = build_windows(loaded.tokenizer, template, data_paths, opts.seq_len, opts.data_format)
    arrays = {"ids": w.ids, "mask": w.mask, "record": w.record}
    calib = None
    if opts.eval_data:
        e = build_windows(loaded.tokenizer, template, opts.eval_data, opts.seq_len, opts.data_format)
        calib = (e.ids, e.mask)
        arrays.update(calib_ids=e.ids, calib_mask=e.mask)
    RecordStream(w.ids, w.mask, w.record, calib_windows=opts.calib_windows, calib=calib)  # validates size

    def save():
        with atomic_path(run_dir / WINDOWS_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    return w.summary.to_json(), save


def sensitivity_errors(run: Run, progress: bool = False) -> dict:
    """Per-tensor, per-type ggml quantization errors of the run's model (cached in the run folder), measured
    tensor by tensor (memory bounded by the largest tensor)."""
    from toolkit import sensitivity

    from toolkit.run import quant_cache_dir

    shared = quant_cache_dir(run.meta["model_sha256"]) / "sensitivity.json"  # reused by later runs of the model
    bank = run.bank()
    errors = sensitivity.error_table(run.layout, bank.original, cache=shared, progress=progress,
                                     imatrix=run.imatrix(), threads=bank.threads)
    if not (run.path / "sensitivity.json").exists():  # the run folder keeps its own copy for search / emit
        write_json(run.path / "sensitivity.json", json.loads(shared.read_text()))
    return errors


def _given_imatrix(opts: TrainOptions, loaded):
    """The --imatrix file, checked against the model (before the run folder is made); None otherwise.
    Types that need an importance matrix in the menu without one are refused here too."""
    from converters import imatrix as imx
    from converters.quant_types import get

    if not opts.imatrix:
        needy = [q for q in opts.menu if get(q).needs_imatrix]
        if needy:
            raise CoaloraError(f"--menu {needy[0]}: it needs an importance matrix; drop --no-imatrix")
    if opts.imatrix in ("", "train"):
        return None
    return imx.load_for(opts.imatrix, imx.model_shapes(loaded.gguf))


def _set_imatrix(run: Run, opts: TrainOptions, given, progress: bool, log) -> None:
    """Compute (from the training windows) or copy the run's importance matrix into RUN/imatrix.gguf, record its
    sha256, and let the layout's matrices that have one take the types that need it: with the default menu, the
    IQ1-IQ3 types join the layout's menu (the options keep the menu asked for)."""
    from converters.quant_types import IMATRIX_NAMES
    from toolkit import importance

    layout = run.layout
    if not opts.imatrix:
        return
    loaded = run.loaded()
    if opts.imatrix == "train":
        stream = calibration_stream(run)
        if isinstance(stream, RecordStream):
            ids = stream.train_ids.numpy()[:opts.imatrix_chunks]
            valid = importance.unpadded(ids, loaded.tokenizer)
        else:
            ids, valid = importance.text_chunks(loaded, stream.train.numpy(), opts.seq_len, opts.imatrix_chunks), None
        log(f"importance matrix from {len(ids)} training windows of {ids.shape[1]} tokens")
        im = importance.compute(loaded, ids, valid, device=run.device, batch=opts.batch,
                                datasets=run.meta["data"], progress=progress)
        im.save(run.imatrix_path)
    else:
        im = given
        with atomic_path(run.imatrix_path) as tmp:
            tmp.write_bytes(Path(opts.imatrix).read_bytes())
    run.meta["imatrix_sha256"] = im.sha256
    menu = layout.menu_names + IMATRIX_NAMES if tuple(layout.menu_names) == DEFAULT_MENU else layout.menu_names
    run.meta["layout"] = layout.with_menu(menu).with_imatrix(im.sums).describe()
    run.__dict__.pop("layout", None)  # the cached layout is the one without the imatrix


def _initial_trainset(run: Run, opts: TrainOptions, progress: bool = False) -> list[Configuration]:
    from toolkit import sensitivity

    errors = sensitivity_errors(run, progress)
    lo, hi = sensitivity.byte_range(run.layout)
    greedy = sensitivity.initial_training_set(run.layout, errors, sensitivity.bpw_of_bytes(run.layout, lo),
                                              sensitivity.bpw_of_bytes(run.layout, hi))
    return list(dict.fromkeys(greedy + llama_cpp_files(run)))


def llama_cpp_files(run: Run) -> list[Configuration]:
    """The files a device gets when no mix of coalora's beats them (search and emit always weigh them): each
    uniform type of the menu asked for, with llama.cpp's row fallbacks, and llama-quantize's own mixes (Q4_K_M, ...)
    made of those types. They stay in the training set through every search round, so the configuration-aware
    model learns the configurations most often deployed. The IQ1-IQ3 types an imatrix adds to the default menu are
    left to the Pareto fronts: their uniform files are rarely deployed and quantizing them costs the most."""
    from toolkit.budget_search import llama_mixes

    layout = run.layout
    asked = set(run.meta["options"].get("menu") or layout.menu_names)
    files = [layout.uniform(t) for t in layout.menu_names if t in asked] + list(llama_mixes(run, layout).values())
    return [c for c in dict.fromkeys(files) if layout.on_menu(c, asked)]


def _search_round(run: Run, round_index: int, opts: TrainOptions, log) -> list[Configuration]:
    """Evaluate candidates for real with the current model, archive them, return the new training set."""
    from toolkit import pareto_search

    archive = pareto_search.Archive.load(run.archive_path) if run.archive_path.exists() else pareto_search.Archive()
    # Losses of earlier rounds belong to an earlier adapter: score the whole archive with the current one.
    def loss(cfgs):  # ranked by loss alone: no divergence from the unquantized model
        return run.calibration_loss(cfgs, divergence=False)

    for record, value in zip(archive.records, loss(archive.configs())):
        record.loss = value
    archive, trainset = pareto_search.refine(run.layout, archive, loss, n_new=opts.search_candidates,
                                             seed=opts.seed + round_index, round_index=round_index,
                                             seed_configurations=run.trainset(), errors=sensitivity_errors(run))
    trainset = list(dict.fromkeys(trainset + llama_cpp_files(run)))
    archive.save(run.archive_path)
    write_json(run.trainset_path, [c.to_json() for c in trainset])
    pareto_search.plot_pareto(archive, trainset, run.path / "pareto.png", layout=run.layout)
    pareto_search.write_pareto_json(archive, trainset, run.path / "pareto.json")
    log(f"search round {round_index}: archive {len(archive)} configurations, training set {len(trainset)}")
    return trainset


def _with_targets(opts: TrainOptions, layout) -> TrainOptions:
    """``opts`` with its LoRA targets spelled out: every block projection of the model when none are given."""
    kinds = layout.projection_kinds()
    bad = [k for k in opts.targets if k not in kinds]
    if bad:
        raise CoaloraError(f"--targets: this {len(kinds)}-kind model has no {bad[0]!r}; its kinds: {', '.join(kinds)}")
    return replace(opts, targets=tuple(opts.targets) or kinds)


def train(run_dir, model_path, data_paths, opts: TrainOptions, *, resume: bool = False,
          fixed_config: Configuration | None = None, progress: bool = True, log=print,
          interrupt_at: int | None = None) -> Run:
    """Train (or, with ``resume``, continue) the run in ``run_dir``.

    Under torchrun / accelerate launch every rank calls this (:mod:`toolkit.distributed`): each trains its
    share of the step's batch with its own configurations (``--configs-per-step`` per rank; the run records the
    step's total), gradients are averaged, rank 0 alone writes and runs the configuration search, whose
    training set it broadcasts. N ranks equal one process with N times the configurations per step.
    """
    from toolkit import distributed
    from toolkit.run import resolve_device

    run_dir = Path(run_dir)
    try:
        device, bad_device = resolve_device(opts.device), None  # a bad --device fails before anything is written
    except CoaloraError as e:
        device, bad_device = torch.device("cpu"), e
    group = distributed.start(device.type)
    group.agree(lambda: _raise(bad_device))
    device = group.device(device)
    if not group.is_main:  # rank 0 alone prints and writes
        log, progress = (lambda s: None), False
    torch.manual_seed(opts.seed)
    opts = replace(opts, configs_per_step=opts.configs_per_step * group.world)
    run, opts, save_new = group.agree(lambda: _open_run(run_dir, model_path, data_paths, opts, resume, fixed_config,
                                                        group.world, log))
    group.check_same(_launch_digest(run, opts, resume))
    run.meta["world_size"] = group.world
    run.device = device
    if save_new is not None:
        group.agree(lambda: save_new(run, progress) if group.is_main else None)
        if not group.is_main:  # rank 0 wrote run.json: the importance matrix's sha256 and the layout it opens
            run.meta = Run.open(run_dir, require_trained=False).meta
            run.__dict__.pop("layout", None)

    stream = calibration_stream(run)  # the run folder rank 0 wrote (several nodes: a shared filesystem)
    model, optim, start, rounds_done, elapsed, anchor = group.agree(
        lambda: _training_state(run, opts, resume, group.is_main))
    group.broadcast_tensors([v for k, v in model.state_dict(keep_vars=True).items()
                             if k.startswith(("layers.", "cam."))])  # rank 0's LoRA, corrections and their scales
    trainset = _broadcast_configurations(group, run.trainset() if group.is_main else None)
    if not trainset:
        raise CoaloraError(f"run {run_dir} has an empty training configuration set")
    params = [p for grp in optim.param_groups for p in grp["params"]]
    lora = optim.param_groups[0]["params"]
    shard = opts.batch // group.world if opts.config_batch == "split" else opts.batch  # sequences per rank
    amp = group.agree(lambda: _plan_memory(run, model, opts, trainset + ([anchor] if anchor else []), shard, group,
                                           log))

    _warm_bank(run, trainset + ([anchor] if anchor else []), progress, group)
    rounds = max(1, opts.rounds) if opts.mode == "coa" else 1
    per_round = math.ceil(opts.steps / rounds)
    tokens_per_step = opts.batch * opts.seq_len
    bar = _progress(progress, opts.steps, start)
    t0, ema, anchor_ema = time.perf_counter(), None, None
    loss_name = "kl" if anchor is not None and opts.anchor_loss == "kl" else "loss"
    model.train()
    for step in range(start, opts.steps):
        if step > 0 and step % per_round == 0 and step // per_round > rounds_done:
            rounds_done = step // per_round
            if group.is_main:
                _checkpoint(run, model, optim, step, rounds_done, elapsed + time.perf_counter() - t0)
            with amp():
                found = _search_round(run, rounds_done, opts, log) if group.is_main else None
            trainset = _broadcast_configurations(group, found)
            _warm_bank(run, trainset, progress, group)
            model.train()
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt
        batch, labels = stream.labelled_batch(opts.seed, step, opts.batch)  # the whole step's batch on every rank
        if shard < opts.batch:  # this rank's share
            rows = slice(group.rank * shard, (group.rank + 1) * shard)
            batch, labels = batch[rows], labels[rows]
        batch, labels = batch.to(run.device), labels.to(run.device)
        for grp in optim.param_groups:
            grp["lr"] = opts.lr_at(step, grp["base_lr"])
        optim.zero_grad(set_to_none=True)
        target, a = None, 0.0
        if anchor is not None:  # the anchor learns the text on the whole batch; its output is the target below
            model.set_configuration(anchor)
            with amp():
                out = model(batch, labels=labels)
            out.loss.backward()
            a = out.loss.item()
            if opts.anchor_loss == "kl":
                target = torch.log_softmax(out.logits.detach().float(), dim=-1)
            del out
            if opts.anchor_lora_weight != 1.0:  # kept to re-weight the configurations' share below
                anchor_grads = [p.grad.clone() for p in lora]
        # this rank's configurations: parts rank*k .. rank*k+k-1 of the step's configurations over all ranks
        k = max(1, (opts.configs_per_step if len(trainset) > 1 else 1) // group.world)
        if opts.config_batch == "full":
            parts, label_parts = [batch] * k, [labels] * k
        else:
            parts, label_parts = batch.tensor_split(min(k, len(batch))), labels.tensor_split(min(k, len(batch)))
        loss, n_seqs, row = 0.0, sum(len(q) for q in parts), 0
        for j, (part, part_labels) in enumerate(zip(parts, label_parts)):  # one configuration per part
            cfg = opts.pick(trainset, run.layout.bits_per_weight, step, group.rank * k + j)
            model.set_configuration(cfg)
            if target is None:
                with amp():
                    part_loss = model(part, labels=part_labels).loss
            else:  # distillation: match the anchor's next-token distribution (on the target positions of records)
                weight = _target_positions(part_labels) if isinstance(stream, RecordStream) else None
                with amp():
                    logits = model(part).logits
                part_loss = _kl(target[row:row + len(part)], logits, weight)
                row = row + len(part) if opts.config_batch == "split" else 0
            part_loss = part_loss * (len(part) / n_seqs)
            part_loss.backward()
            loss = loss + part_loss.detach()
        if anchor is not None and opts.anchor_lora_weight != 1.0:
            with torch.no_grad():
                for p, g in zip(lora, anchor_grads):
                    p.grad.mul_(opts.anchor_lora_weight).add_(g, alpha=1.0 - opts.anchor_lora_weight)
        step_loss, a = group.average_gradients(params, [float(loss), a])  # the mean over ranks (one process: as is)
        for grp in optim.param_groups:  # per group: the LoRA's steps do not depend on the CAM's gradients
            torch.nn.utils.clip_grad_norm_(grp["params"], opts.clip)
        optim.step()
        ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
        if anchor is not None:
            anchor_ema = a if anchor_ema is None else 0.9 * anchor_ema + 0.1 * a
        done = step + 1
        rate = (done - start) * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
        shown = f"{loss_name} {ema:.3f}" + (f"  anchor loss {anchor_ema:.3f}" if anchor_ema is not None else "")
        bar(done, f"{shown}  {rate:,.0f} tok/s  cfg {run.layout.bits_per_weight(cfg):.2f} bpw")
        if done % opts.checkpoint_every == 0 and done < opts.steps and group.is_main:  # the last one is written below
            _checkpoint(run, model, optim, done, rounds_done, elapsed + time.perf_counter() - t0)
    bar(None, "")
    elapsed += time.perf_counter() - t0
    if not group.is_main:
        return run
    _checkpoint(run, model, optim, opts.steps, rounds_done, elapsed)
    run.meta.update(status="trained", step=opts.steps, train_seconds=round(elapsed, 2), device=str(run.device),
                    tokens_per_second=round((opts.steps - start) * tokens_per_step / max(elapsed, 1e-9), 1),
                    final_loss=ema, final_loss_kind="kl" if loss_name == "kl" else "cross-entropy",
                    **({"final_anchor_loss": anchor_ema} if anchor_ema is not None else {}))
    run.save_meta()
    if opts.mode == "coa":
        with amp():
            _search_round(run, rounds_done + 1, opts, log)
    return run


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


def _open_run(run_dir: Path, model_path, data_paths, opts: TrainOptions, resume: bool,
              fixed_config: Configuration | None, world: int, log):
    """Check everything and load the model, writing nothing: (run, options, None when resuming or else the
    function that creates the run folder)."""
    from converters.model_loading import load_model

    if opts.config_batch == "split" and opts.batch % world:
        raise CoaloraError(f"--batch {opts.batch} is not divisible by the world size {world} "
                           f"(each of the {world} ranks trains batch / {world} sequences)")
    if resume:
        run = Run.open(run_dir, require_trained=False)
        if model_path is not None:  # the run must have been trained on it
            from toolkit.assets import resolve_model

            run.check_model(resolve_model(str(model_path)))
        opts = _with_targets(opts, run.layout)
        for path, digest in (run.meta.get("data_sha256") or {}).items():
            if Path(path).is_file() and sha256_file(path) != digest:
                raise CoaloraError(f"--resume: {path} changed since the run started; start a new run on it")
        old = run.meta["options"]
        defaults = asdict(TrainOptions())  # options added later default in older runs
        changed = [k for k in _FROZEN if _norm(old.get(k, defaults[k])) != _norm(asdict(opts)[k])]
        if changed == ["configs_per_step"] and world != run.meta.get("world_size", 1):
            total = old.get("configs_per_step", 1)
            hint = (f"pass --configs-per-step {total // world}" if total % world == 0 else
                    f"a world size dividing {total}")
            raise CoaloraError(f"--resume: the run trains {total} configurations per step (--configs-per-step x "
                               f"world size); on {world} ranks {hint}")
        if changed:
            raise CoaloraError(f"--resume with different {', '.join(changed)} than the run was started with")
        run.meta["options"]["steps"] = opts.steps
        return run, opts, None
    if (run_dir / "run.json").exists():
        raise CoaloraError(f"{run_dir} already holds a run; use --resume or another output folder")
    check_records([*data_paths, *opts.eval_data], opts.data_format)  # before the model loads (seconds)
    model_path = Path(model_path)
    loaded = load_model(model_path, log=log)
    layout = loaded.layout(include_embeddings=opts.include_embeddings).with_menu(opts.menu)
    if opts.include_embeddings and opts.embedding_menu:
        layout = layout.with_embedding_menu(opts.embedding_menu)
    opts = _with_targets(opts, layout)
    given = _given_imatrix(opts, loaded)
    if fixed_config is not None:  # before any folder exists
        from converters.imatrix import check_configuration
        from toolkit.importance import collected_names

        check_configuration(fixed_config, given or (collected_names(loaded) if opts.imatrix else None))
    run = Run(run_dir, loaded=loaded, meta={
        "status": "training", "model": str(model_path.resolve()), "model_sha256": model_fingerprint(model_path),
        "arch": loaded.arch, "options": _jsonable(asdict(opts)), "layout": layout.describe(),
        "data": [str(Path(p).resolve()) for p in data_paths], "step": 0,
        "data_sha256": {str(Path(p).resolve()): sha256_file(p) for p in [*data_paths, *opts.eval_data]},
    })
    run.meta["data_summary"], save_data = _prepare_data(run_dir, loaded, data_paths, opts)
    if run.meta["data_summary"]["truncated"]:
        log(f"warning: {run.meta['data_summary']['truncated']} records longer than --seq-len "
            f"{opts.seq_len} were truncated")
    if fixed_config is not None:
        layout.validate(fixed_config, strict_menu=False)

    def save(run: Run, progress: bool) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_data()
        _set_imatrix(run, opts, given, progress, log)
        trainset = [fixed_config] if fixed_config is not None else _initial_trainset(run, opts, progress)
        write_json(run.trainset_path, [c.to_json() for c in trainset])
        run.save_meta()
    return run, opts, save


def _launch_digest(run: Run, opts: TrainOptions, resume: bool) -> dict:
    """What every rank must agree on: options, model and data (sha256)."""
    return {"options": json.dumps(_jsonable(asdict(opts)), sort_keys=True), "resume": resume,
            "model": run.meta["model_sha256"], "data": json.dumps(run.meta.get("data_sha256"), sort_keys=True),
            "step": run.meta.get("step")}


def _training_state(run: Run, opts: TrainOptions, resume: bool, main: bool):
    """The model (rank 0 sets its correction scales / initial LoRA, then broadcasts them), its optimizer, and
    where training starts: (model, optimizer, step, rounds done, seconds so far, anchor configuration)."""
    model = run.model()  # fresh LoRA, or the checkpoint's when resuming
    fresh = not (resume and run.checkpoint_path.exists())
    if fresh and opts.type_deltas and main:
        _set_delta_scales(run, model, opts.delta_error_power)
    if opts.init_lora and fresh and main:
        _start_from_lora(model, Path(opts.init_lora))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    groups = [{"params": lora, "lr": opts.lr, "base_lr": opts.lr}]
    if model.cam is not None:
        groups.append({"params": list(model.cam.parameters()), "lr": opts.cam_lr, "base_lr": opts.cam_lr})
    deltas = [p for n, p in model.named_parameters() if ".delta_" in n]
    if deltas:  # a step only updates the corrections of the types its configuration uses (the others have no grad)
        lr = opts.delta_lr or opts.lr
        groups.append({"params": deltas, "lr": lr, "base_lr": lr})
    optim = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    start, rounds_done, elapsed = 0, 0, 0.0
    if not fresh:
        state = load_checkpoint(run.checkpoint_path)
        try:
            optim.load_state_dict(state["optim"])
        except (ValueError, KeyError, RuntimeError):
            raise CoaloraError(f"checkpoint {run.checkpoint_path} does not match this run") from None
        start, rounds_done, elapsed = state["step"], state.get("rounds_done", 0), state.get("elapsed", 0.0)
    return model, optim, start, rounds_done, elapsed, _anchor_configuration(run, opts)


def _plan_memory(run: Run, model, opts: TrainOptions, cfgs: list[Configuration], shard: int, group, log):
    """Print and check the rank's memory plan, size the weight bank's cache from it, set the weights dtype and
    activation checkpointing; returns the autocast context of the forward passes (a no-op in float32)."""
    import contextlib

    from toolkit import memory_plan

    shape = memory_plan.ModelShape.of(run.loaded(), run.layout)
    dtype = opts.weights_dtype
    if dtype == "auto":
        big = shape.n_quantized * 4 > opts.weights_limit_gib * memory_plan.GIB
        dtype = "bfloat16" if run.device.type == "cuda" and big else "float32"
    if dtype not in memory_plan.DTYPE_BYTES:
        raise CoaloraError(f"--weights-dtype {dtype}: choose from auto, {', '.join(memory_plan.DTYPE_BYTES)}")
    width = memory_plan.DTYPE_BYTES[dtype]
    pairs = {(n, q.name) for c in cfgs for n, q in c.types.items()}
    wanted = max(0, sum(run.layout[n].n_weights for n, _ in pairs) - shape.n_quantized) * width
    k = max(1, (opts.configs_per_step if len(cfgs) > 1 else 1) // group.world)
    sequences = shard if opts.config_batch == "full" else -(-shard // k)
    plan = memory_plan.plan(shape, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                            sequences=sequences, seq_len=opts.seq_len, weights_dtype=dtype,
                            checkpointing=opts.activation_checkpointing, bank_wanted=wanted, device=run.device,
                            available=memory_plan.available_bytes(run.device))
    log(plan.describe())
    plan.check()
    bank = run.bank()
    bank.dtype = getattr(torch, dtype)
    room = shape.n_quantized * width + plan.bank  # the bank holds the current configuration too
    bank.ram_limit = room if run.device.type == "cuda" else min(bank.ram_limit, max(room, shape.n_quantized * width))
    if opts.activation_checkpointing:
        # newer transformers name it activation_checkpointing_enable; 5.17 has only gradient_checkpointing_enable
        enable = (getattr(model.base, "activation_checkpointing_enable", None)
                  or model.base.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    if dtype == "float32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, run.device.type, dtype=bank.dtype)


def _broadcast_configurations(group, cfgs: list[Configuration] | None) -> list[Configuration]:
    """Rank 0's configurations on every rank."""
    data = group.broadcast(None if cfgs is None else [c.to_json() for c in cfgs])
    return [Configuration.from_json(d) for d in data]


def _anchor_configuration(run: Run, opts: TrainOptions) -> Configuration | None:
    """The uniform configuration of ``opts.anchor`` (only for CoA-LoRA / shared training)."""
    if not opts.anchor or opts.mode == "single":
        return None
    from converters.quant_types import get

    try:
        return run.layout.uniform(get(opts.anchor).name)
    except (KeyError, ValueError) as e:
        raise CoaloraError(f"--anchor {opts.anchor}: {e}") from None


def _kl(target_logp: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions (those with ``weight``, if given) of KL(anchor || configuration) of the next-token
    distributions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(logp, target_logp, log_target=True, reduction="none").sum(-1)
    if weight is None:
        return kl.mean()
    return (kl * weight).sum() / weight.sum().clamp(min=1)


def _target_positions(labels: torch.Tensor) -> torch.Tensor:
    """1.0 where a position's next token is a training target (the positions whose prediction is trained)."""
    w = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    w[:, :-1] = (labels[:, 1:] != -100).float()
    return w


def _set_delta_scales(run: Run, model, power: float) -> None:
    """Scale each tensor's type corrections by (RMS ggml error of that type / that of Q4_0) ** power: the
    corrections learn at the size of the error they answer (Adam moves every parameter at about the learning rate,
    so an unscaled Q8_0 correction, whose error is ~16x smaller than Q4_0's, grows as large as a Q4_0 one)."""
    from converters.quant_types import get
    from toolkit import sensitivity

    errors = sensitivity_errors(run)
    q4_0 = get("Q4_0")
    for name in model.lora_names:
        layer, row = model.layer(name), errors[name]
        ref = row.get("Q4_0")
        if ref is None and q4_0.fits_row(run.layout[name].n_per_row):  # not in the menu: measure it
            ref = sensitivity.tensor_errors(run.bank().original(name), [q4_0],
                                            quant_weights=run.bank().importance(name, q4_0))["Q4_0"]
        if not ref:
            continue  # Q4_0 does not fit this tensor: scale 1
        layer.set_delta_scales({q: (row[q] / ref) ** (power / 2) for q in layer.delta_A.keys()})


def _start_from_lora(model, source: Path) -> None:
    """Copy the LoRA matrices of a trained run (e.g. a full-precision fine-tune) into ``model``."""
    if not (source / "run.json").is_file():
        raise CoaloraError(f"--init-lora {source}: no trained run there")
    ckpt = Run.open(source, require_trained=False).checkpoint_path
    if not ckpt.is_file():
        raise CoaloraError(f"--init-lora {source}: no trained run there")
    lora = {k: v for k, v in load_checkpoint(ckpt)["lora"].items() if k.startswith("layers.") and ".lora_" in k}
    lora.update({k: v for k, v in model.state_dict().items() if ".delta_" in k})  # this run's type corrections start at 0
    try:
        model.load_lora_state(lora, parts=("layers.",))
    except ValueError:
        raise CoaloraError(f"--init-lora {source}: its LoRA does not match this run (model, rank or targets differ)") \
            from None


def _checkpoint(run: Run, model, optim, step: int, rounds_done: int, elapsed: float) -> None:
    save_checkpoint(run.checkpoint_path, {"lora": model.lora_state(), "optim": optim.state_dict(), "step": step,
                                          "rounds_done": rounds_done, "elapsed": elapsed})
    run.meta["step"] = step
    run.save_meta()


def _warm_bank(run: Run, cfgs: list[Configuration], progress: bool, group=None) -> None:
    """Quantize (with ggml) and dequantize every (tensor, type) the configurations use, once. Several ranks
    first quantize a share each into the shared on-disk cache, then read the others' from it."""
    bank = run.bank()
    pairs = sorted({(n, q.name) for c in cfgs for n, q in c.types.items()})
    if group is not None and group.parallel:
        for n, q in pairs[group.rank::group.world]:
            if q not in UNQUANTIZED:
                bank.quantized_bytes(n, q)
        group.barrier()
    bar = _progress(progress and len(pairs) > 50, len(pairs), 0, "quantizing with ggml")
    for i, (n, q) in enumerate(pairs):
        bank.weight(n, q)
        bar(i + 1, "")
    bar(None, "")


def _progress(enabled: bool, total: int, start: int, label: str = "training"):
    """A tqdm bar on a terminal; elsewhere (logs, CI) a plain line at most every 30 seconds."""
    if not enabled:
        return lambda done, text: None
    import sys

    if not sys.stderr.isatty():
        last = [0.0]

        def line(done, text):
            now = time.perf_counter()
            if done is not None and (now - last[0] >= 30 or done == total):
                last[0] = now
                print(f"{label}: {done}/{total} {text}", file=sys.stderr, flush=True)

        return line
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=label, unit="step" if label == "training" else "tensor",
               dynamic_ncols=True, leave=False)

    def update(done, text):
        if done is None:
            bar.close()
            return
        bar.n = done
        bar.set_postfix_str(text, refresh=False)
        bar.refresh()

    return update


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
