"""`coalora demo`: the whole pipeline on SmolLM2 + Austen with small settings, ending in a table per profile."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from converters.errors import CoaloraError
from toolkit import cmd_options as ranges
from toolkit.recipes import DEFAULT as DEMO_RECIPE  # the demo runs `coalora train`'s defaults


def run_demo(out: Path, steps: int, windows: int, log=click.echo, recipe: str = DEMO_RECIPE,
             imatrix: bool = True) -> list[dict]:
    from toolkit import assets
    from toolkit.emit import emit
    from toolkit.package import package
    from toolkit.profiles import list_profiles
    from toolkit.recipes import train_options
    from toolkit.run import Run
    from toolkit.training import TrainOptions, train
    from toolkit.validate import validate

    t0 = time.perf_counter()
    log("1/4 assets: SmolLM2-135M-Instruct and Jane Austen")
    assets.fetch_all()
    run_dir = out / "run"
    log(f"2/4 training CoA-LoRA ({steps} steps, 2 search rounds, recipe {recipe}) in {run_dir}")
    if (run_dir / "run.json").exists() and Run.open(run_dir, require_trained=False).meta.get("status") == "trained":
        run = Run.open(run_dir)
        log("    (already trained; reusing it)")
    else:
        opts = TrainOptions(steps=steps, seq_len=128, batch=4, rounds=2, search_candidates=8, checkpoint_every=20,
                            imatrix="train" if imatrix else "", **train_options(recipe, TrainOptions().menu))
        run = train(run_dir, assets.smollm2_path(), assets.resolve_texts(["austen"]), opts,
                    resume=(run_dir / "run.json").exists(), log=lambda s: log("    " + s))
    rows = []
    for profile in list_profiles():
        log(f"3/4 {profile.name}: emit, validate, package")
        manifest = emit(run, profile, out / "dist", n_windows=windows, log=lambda s: log("    " + s))
        report = validate(out / "dist" / profile.name, log=lambda s: log("    " + s))
        tarball = package(out / "dist" / profile.name, out / "packages" / f"{profile.name}.tar.gz")
        ev, mem = report["evaluation"], report["memory"]
        rows.append({
            "profile": profile.name, "budget_bytes": manifest["search"]["budget_bytes"],
            "model_bytes": manifest["files"]["model.gguf"]["bytes"], "bpw": manifest["search"]["bits_per_weight"],
            "chosen": manifest["search"]["source"], "confirmation": manifest["search"]["confirmation"],
            "adapter": manifest["search"].get("adapter", "generated"),
            "adapter_bytes": manifest["files"]["adapter.gguf"]["bytes"],
            "ppl_no_adapter": ev["perplexity_base"], "ppl_adapter": ev["perplexity_adapter"],
            "ppl_predicted": ev["predicted_perplexity"],
            "memory_predicted": mem["predicted_total_bytes"], "memory_measured": mem["measured_peak_rss_bytes"],
            "verdicts": "ok" if report["ok"] else ", ".join(k for k, v in report["verdicts"].items() if v is False),
            "package": str(tarball),
        })
    log(f"4/4 done in {time.perf_counter() - t0:.0f} s")
    return rows


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("-o", "--out", default="coalora-demo", show_default=True, type=click.Path(path_type=Path))
    @click.option("--steps", type=ranges.train("steps"), default=50, show_default=True, help="Training steps (128 x 4 tokens each).")
    @click.option("--windows", type=ranges.WINDOWS, default=4, show_default=True, help="Evaluation windows of 512 tokens per profile.")
    @click.option("--recipe", default=DEMO_RECIPE, show_default=True, metavar="NAME|FILE.toml",
                  help="Training recipe (as `coalora train --recipe`).")
    @click.option("--imatrix/--no-imatrix", default=True, show_default=True,
                  help="Compute an importance matrix from the training text, as `coalora train` does by default.")
    @click.option("--json", "as_json", is_flag=True)
    def demo(out, steps, windows, recipe, imatrix, as_json):
        """Run the whole pipeline on SmolLM2 + Austen: train, search, emit, validate, package every profile.

        Example: coalora demo -o coalora-demo
        """
        from converters.fileio import write_json

        t0 = time.perf_counter()
        from toolkit.recipes import load_recipe

        load_recipe(recipe)  # a bad recipe fails before anything runs
        rows = run_demo(out, steps, windows, log=(lambda s: None) if as_json else click.echo, recipe=recipe,
                        imatrix=imatrix)
        write_json(out / "demo.json", {"steps": steps, "windows": windows, "recipe": recipe, "imatrix": imatrix,
                                       "wall_seconds": round(time.perf_counter() - t0, 1), "profiles": rows})
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            _table(rows)
        if any(r["verdicts"] != "ok" for r in rows):
            raise CoaloraError("some profiles failed validation (see the verdicts column)")


def _table(rows: list[dict]) -> None:
    from toolkit.console import console
    from rich.table import Table

    t = Table(title="coalora demo: SmolLM2-135M-Instruct fine-tuned on Austen, per device profile")
    for col in ("profile", "budget MB", "model MB", "bpw", "chosen", "adapter", "adapter MB", "ppl no adapter",
                "ppl adapter", "ppl predicted", "memory MB (model/measured)", "verdicts"):
        t.add_column(col, justify="left" if col in ("profile", "chosen", "adapter", "verdicts") else "right")
    mb = lambda b: "" if b is None else f"{b / 1e6:.1f}"  # noqa: E731
    for r in rows:
        t.add_row(r["profile"], mb(r["budget_bytes"]), mb(r["model_bytes"]), f"{r['bpw']:.2f}", r.get("chosen", ""),
                  r.get("adapter", ""), mb(r["adapter_bytes"]),
                  f"{r['ppl_no_adapter']:.3f}", f"{r['ppl_adapter']:.3f}", f"{r['ppl_predicted']:.3f}",
                  f"{mb(r['memory_predicted'])} / {mb(r['memory_measured'])}", r["verdicts"])
    console().print(t)
