"""`coalora train`, `coalora finetune`, `coalora adapter`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from toolkit import assets, distributed
from toolkit import cmd_options as ranges
from converters.configuration import DEFAULT_EMBEDDING_MENU, DEFAULT_MENU, Configuration
from converters.errors import CoaloraError
from toolkit.recipes import KEYS, type_deltas


def _train_options(f):
    opts = [
        click.option("--rank", type=ranges.train("rank"), default=8, show_default=True, help="LoRA rank r."),
        click.option("--alpha", type=ranges.train("alpha"), default=16.0, show_default=True, help="LoRA alpha (scale alpha/r)."),
        click.option("--steps", type=ranges.train("steps"), default=200, show_default=True, help="Optimizer steps."),
        click.option("--seq-len", type=ranges.train("seq_len"), default=256, show_default=True, help="Tokens per sequence."),
        click.option("--batch", type=ranges.train("batch"), default=4, show_default=True, help="Sequences per step."),
        click.option("--lr", type=ranges.train("lr"), default=1e-3, show_default=True, help="Learning rate of the LoRA."),
        click.option("--targets", default="all", show_default=True,
                     help="Comma-separated GGUF tensor kinds that get a LoRA (attn_q,ffn_down,...; phi3: attn_qkv,...); "
                          "all: every block projection of the architecture."),
        click.option("--data-format", type=click.Choice(["auto", "chat", "instruction", "text"]), default="auto",
                     show_default=True, help="Record files (.jsonl/.json/.parquet/.csv): auto detects messages "
                     "(chat), prompt+completion (instruction) or text; chat and instruction records use the "
                     "model's chat template, with the loss on the answers only."),
        click.option("--eval-data", multiple=True, help="Held-out records the search scores configurations on "
                     "(default: the last whole records of --data)."),
        click.option("--imatrix", "imatrix_file", default=None, type=click.Path(dir_okay=False),
                     help="Importance matrix file for every quantization of the run (default: computed from the "
                          "training data, as llama-imatrix would; it lets the search use the IQ1-IQ3 types)."),
        click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix."),
                click.option("--seed", type=ranges.train("seed"), default=0, show_default=True),
        click.option("--device", default="auto", show_default=True,
                     help="Where torch trains: auto (a CUDA GPU when torch sees one), cpu, cuda[:N]."),
        click.option("--checkpoint-every", type=ranges.train("checkpoint_every"), default=25, show_default=True, help="Steps between checkpoints."),
        click.option("--weights-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True, help="What torch keeps the dequantized weights in; 16-bit halves their "
                     "memory but is no longer bit-exact to llama.cpp. auto: bfloat16 on a GPU when the model's float32 "
                     "weights exceed --weights-limit, else float32."),
        click.option("--weights-limit", "weights_limit_gib", default=8.0, show_default=True,
                     type=click.FloatRange(0.0), help="GiB of float32 weights above which auto uses bfloat16 on a GPU."),
        click.option("--activation-checkpointing", is_flag=True,
                     help="Recompute each block's activations in the backward pass (less memory, ~30% more compute)."),
        click.option("--resume", is_flag=True, help="Continue the run in -o from its last checkpoint."),
        click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# Experiment switches: hidden from `coalora train --help` (README: Training recipes); default None, i.e.
# the recipe's value (or TrainOptions' default when the recipe leaves it out).
EXPERIMENT_OPTIONS = [
    click.option("--cam-lr", type=ranges.train("cam_lr"), default=None, hidden=True),
    click.option("--configs-per-step", type=ranges.train("configs_per_step"), default=None, hidden=True),
    click.option("--config-batch", type=click.Choice(["split", "full"]), default=None, hidden=True),
    click.option("--top-share", type=ranges.train("top_share"), default=None, hidden=True),
    click.option("--low-share", type=ranges.train("low_share"), default=None, hidden=True),
    click.option("--anchor", default=None, metavar="TYPE", hidden=True),
    click.option("--anchor-loss", type=click.Choice(["kl", "ce"]), default=None, hidden=True),
    click.option("--anchor-lora-weight", type=ranges.train("anchor_lora_weight"), default=None, hidden=True),
    click.option("--type-deltas", default=None, metavar="TYPES", hidden=True),
    click.option("--delta-lr", type=ranges.train("delta_lr"), default=None, hidden=True),
    click.option("--delta-error-power", type=ranges.train("delta_error_power"), default=None, hidden=True),
]
EXPERIMENT_KEYS = tuple(KEYS)


def _experiment_options(f):
    for o in reversed(EXPERIMENT_OPTIONS):
        f = o(f)
    return f


COA_ONLY = ("anchor", "anchor_lora_weight", "type_deltas")  # the default recipe's parts that need --mode coa


def _recipe_options(recipe, out, resume: bool, mode: str, given: dict) -> dict:
    """The experiment options of a run: the recipe's (on --resume without --recipe: the run's own), overridden
    by the switches given on the command line. Another --mode leaves out the default recipe's CoA-only parts."""
    from toolkit.recipes import DEFAULT, load_recipe

    if recipe is None and resume and (Path(out) / "run.json").exists():
        from toolkit.run import Run

        o = Run.open(out, require_trained=False).meta.get("options", {})
        base = {k: o[k] for k in KEYS if k in o}
        if "type_deltas" in base:
            base["type_deltas"] = ",".join(base["type_deltas"])
    else:
        base = load_recipe(recipe or DEFAULT)
        if recipe is None and mode != "coa":
            base = {k: v for k, v in base.items() if k not in COA_ONLY}
    given = {k: v for k, v in given.items() if v is not None}
    for k, v in given.items():  # checked as a recipe file's values are, before anything loads
        try:
            KEYS[k](v)
        except (ValueError, CoaloraError) as e:
            raise CoaloraError(f"--{k.replace('_', '-')} {str(v)[:40]}: {e}") from None
    return {**base, **given}


def _targets(s: str) -> tuple:
    """() for all; the model's kinds are checked when the run starts."""
    kinds = tuple(k.strip() for k in s.split(",") if k.strip())
    if not kinds:
        raise CoaloraError(f"--targets {s!r} names no tensor kind")
    return () if kinds == ("all",) else kinds


def _quant_types(s: str) -> tuple:
    """Canonical names of a comma-separated list of quant types (an unknown one is a one-line error)."""
    from converters.quant_types import get
    return tuple(get(t).name for t in s.split(",") if t.strip())


def _report(run, as_json: bool) -> None:
    m = run.meta
    summary = {"run": str(run.path), "mode": m["options"]["mode"], "steps": m["step"],
               "final_loss": m.get("final_loss"), "final_loss_kind": m.get("final_loss_kind", "cross-entropy"),
               **({"final_anchor_loss": m["final_anchor_loss"]} if "final_anchor_loss" in m else {}),
               "data": m.get("data_summary"), "train_seconds": m.get("train_seconds"),
               "tokens_per_second": m.get("tokens_per_second"), "training_configurations": len(run.trainset())}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            click.echo(f"{k:>24}: {v}")


def _run_training(model, data, out, mode, fixed, rank, alpha, steps, seq_len, batch, lr, targets, seed,
                  checkpoint_every, resume, as_json, imatrix_file=None, no_imatrix=False, **extra):
    from toolkit.training import TrainOptions, train

    if imatrix_file and no_imatrix:
        raise CoaloraError("--imatrix and --no-imatrix exclude each other")
    if imatrix_file and not Path(imatrix_file).is_file():
        raise CoaloraError(f"imatrix file not found: {imatrix_file}")
    extra["imatrix"] = "" if no_imatrix else str(Path(imatrix_file).resolve()) if imatrix_file else "train"

    model_path = assets.resolve_model(model) if not resume else model  # resuming: checked against the run's
    texts = assets.resolve_texts(data) if not resume else []
    extra["eval_data"] = tuple(str(p) for p in assets.resolve_texts(extra.get("eval_data") or ())) if not resume else ()
    if not resume and not texts:
        raise CoaloraError("no training text given (--data FILE..., or --data austen)")
    opts = TrainOptions(mode=mode, rank=rank, alpha=alpha, steps=steps, seq_len=seq_len, batch=batch, lr=lr,
                        targets=_targets(targets), seed=seed, checkpoint_every=checkpoint_every, **extra)
    out = Path(out)
    existed = out.exists()
    fresh = not resume and (not existed or (out.is_dir() and not any(out.iterdir())))
    try:
        run = train(out, model_path, texts, opts, resume=resume, fixed_config=fixed, progress=not as_json,
                    log=(lambda s: None) if as_json else click.echo)
    except CoaloraError:
        if fresh and distributed.rank() == 0:  # a new run that failed leaves no half-written folder (an interrupted one stays resumable)
            _remove_new_run(out, keep_folder=existed)
        raise
    if distributed.rank() == 0:  # under torchrun / accelerate launch, rank 0 reports
        _report(run, as_json)


def _remove_new_run(out: Path, keep_folder: bool) -> None:
    import shutil

    if not out.is_dir():
        return
    if not keep_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model")
    @click.option("--data", "-d", multiple=True, default=("austen",), show_default=True,
                  help="Training data: text files, or chat / instruction / text records (.jsonl, .json, .parquet, "
                       ".csv); 'austen' = the five training novels.")
    @click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
    @click.option("--mode", type=click.Choice(["coa", "shared"]), default="coa", show_default=True,
                  help="coa: LoRA + configuration-aware model; shared: one LoRA for all configurations.")
    @click.option("--rounds", type=ranges.train("rounds"), default=2, show_default=True, help="Training / configuration-search rounds.")
    @click.option("--search-candidates", type=ranges.train("search_candidates"), default=12, show_default=True,
                  help="Configurations the search evaluates for real per round.")
    @click.option("--menu", default=",".join(DEFAULT_MENU), show_default=True, help="Quant types to choose from.")
    @click.option("--embedding-menu", default=",".join(DEFAULT_EMBEDDING_MENU), show_default=True,
                  help="Types the token embedding and output head may take besides --menu (as llama-quantize's "
                       "--token-embedding-type / --output-tensor-type); '' for none.")
    @click.option("--recipe", default=None, metavar="NAME|FILE.toml",
                  help="Training recipe: anchored (default; the benchmarked one), plain (the paper's CoA-LoRA), or a "
                       "TOML file of experiment options (README: Training recipes); options given here override it.")
    @click.option("--init-lora", default="", type=click.Path(file_okay=False),
                  help="Start from the LoRA of a trained run (e.g. a `coalora finetune --config F32` run).")
    @_experiment_options
    @_train_options
    def train_cmd(model, data, out, mode, rounds, search_candidates, menu, embedding_menu, recipe, init_lora, **kw):
        """Train one LoRA (+ configuration-aware model) for every quantization configuration of MODEL.

        MODEL is a Hugging Face folder, a .gguf file, or 'smollm2'.
        Example: coalora train smollm2 --data austen -o runs/smol --steps 200
        """
        menu_t = _quant_types(menu)
        exp = _recipe_options(recipe, out, kw["resume"], mode, {k: kw.pop(k) for k in EXPERIMENT_KEYS})
        deltas = type_deltas(str(exp.pop("type_deltas", "")), menu_t)
        if deltas and mode != "coa":
            raise CoaloraError("--type-deltas needs --mode coa (the configuration picks the corrections)")
        _run_training(model, data, out, mode, None, rounds=rounds, search_candidates=search_candidates,
                      menu=menu_t, embedding_menu=_quant_types(embedding_menu),
                      init_lora=str(Path(init_lora).resolve()) if init_lora else "",
                      type_deltas=deltas, **exp, **kw)

    train_cmd.name = "train"

    @cli.command()
    @click.argument("model")
    @click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                  help="Configuration JSON (or a quant type name for a uniform configuration).")
    @click.option("--data", "-d", multiple=True, default=("austen",), show_default=True)
    @click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
    @_train_options
    def finetune(model, config_path, data, out, **kw):
        """Fine-tune a LoRA for ONE configuration (the per-configuration baseline, QLoRA-style).

        Example: coalora finetune smollm2 --config cfg.json -o runs/ft-q4
        """
        from converters.model_loading import load_model
        fixed = None
        if not kw["resume"]:
            layout = load_model(assets.resolve_model(model)).layout()
            fixed = _config_arg(config_path, layout)
        _run_training(model, data, out, "single", fixed, **kw)

    @cli.command()
    @click.argument("run_dir", metavar="RUN")
    @click.option("--config", "config_path", required=True, help="Configuration JSON, or a quant type name.")
    @click.option("-o", "--out", required=True, type=click.Path(), help="Adapter file (.gguf) or PEFT folder.")
    @click.option("--format", "fmt", type=click.Choice(["gguf", "peft"]), default="gguf", show_default=True)
    @click.option("--model", "model", default=None, help="Refuse unless the run was trained on this model.")
    @click.option("--generated/--shared", "generated", default=None,
                  help="The adapter generated for the configuration, or the run's shared LoRA without the "
                       "configuration's adjustment. Default: what the configuration file's \"adapter\" key says "
                       "(`coalora search --confirm` writes it), else generated.")
    @click.option("--json", "as_json", is_flag=True)
    def adapter(run_dir, config_path, out, fmt, model, generated, as_json):
        """Generate the LoRA adapter of RUN for a configuration (llama.cpp GGUF or PEFT).

        Example: coalora adapter runs/smol --config cfg.json -o adapter.gguf
        """
        from toolkit.run import Run
        run = Run.open(run_dir)
        if model:
            run.check_model(assets.resolve_model(model))
        cfg = _config_arg(config_path, run.layout)
        if generated is None:
            generated = _adapter_key(config_path) != "shared"
        run.model()
        t = time.perf_counter()
        run.adapter_tensors(cfg, generated)
        gen_ms = (time.perf_counter() - t) * 1e3
        size = run.write_adapter(cfg, out, fmt, adjusted=generated)
        info = {"adapter": str(out), "format": fmt, "bytes": size, "generation_ms": round(gen_ms, 2),
                "kind": "generated" if generated else "shared",
                "configuration_bpw": round(run.layout.bits_per_weight(cfg), 4),
                "model_file_bytes": run.layout.file_bytes(cfg)}
        click.echo(json.dumps(info, indent=2) if as_json else
                   f"wrote {out} ({size:,} bytes; generated in {gen_ms:.1f} ms for a "
                   f"{info['configuration_bpw']:.2f}-bpw configuration)")


def _adapter_key(arg: str) -> str:
    """The "adapter" key of a configuration file ("generated", "shared"; "" when absent or a type name)."""
    from pathlib import Path
    from converters.fileio import read_json
    if not Path(arg).is_file():
        return ""
    kind = read_json(arg).get("adapter", "")
    if kind not in ("", "generated", "shared"):
        raise CoaloraError(f"{arg}: \"adapter\" must be \"generated\" or \"shared\", not {str(kind)[:40]!r}")
    return kind


def _config_arg(arg: str, layout) -> Configuration:
    """A configuration JSON path, or a quant type name meaning 'every tensor in that type'."""
    from pathlib import Path
    from converters.quant_types import CATALOGUE
    if not Path(arg).exists() and arg.upper() in CATALOGUE:
        return layout.uniform(arg)
    cfg = Configuration.load(arg)
    layout.validate(cfg, strict_menu=False)
    return cfg
