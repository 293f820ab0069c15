"""Deployment commands: ``coalora profiles``, ``coalora emit``, ``coalora validate``, ``coalora package``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from toolkit import cmd_options as ranges
from toolkit.console import console
from converters.errors import CoaloraError


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _status(log_console):
    """A rich status line for long work; returns (context manager, log function)."""
    status = log_console.status("working")
    return status, lambda msg: status.update(msg)


def register(cli):
    @cli.command("profiles")
    @click.argument("name", required=False)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def profiles_cmd(name, as_json):
        """List the device profiles, or show one (NAME or a .toml path)."""
        from rich.table import Table

        from toolkit.profiles import list_profiles, load_profile

        profs = [load_profile(name)] if name else list_profiles()
        if as_json:
            click.echo(json.dumps([p.to_dict() for p in profs] if not name else profs[0].to_dict(), indent=2))
            return
        t = Table(title="device profiles")
        for col in ("name", "memory", "share", "model cap", "context", "threads", "KV", "prefer", "avoid"):
            t.add_column(col)
        for p in profs:
            t.add_row(p.name, f"{p.memory_bytes / 2**30:.0f} GiB", f"{p.model_share:.0%}", _mb(p.model_budget_cap),
                      str(p.context_length), str(p.threads), p.kv_cache_type, ",".join(p.prefer), ",".join(p.avoid))
        con = console()
        con.print(t)
        if name:
            con.print(profs[0].description)

    @cli.command("emit")
    @click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
    @click.option("--profile", "profile", required=True, help="Profile name, a .toml path, or 'all'.")
    @click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="DIST folder.")
    @click.option("--windows", "n_windows", type=ranges.WINDOWS, default=32, show_default=True, help="Evaluation windows (512 tokens).")
    @click.option("--data", type=click.Path(path_type=Path), help="Held-out text (default: Pride and Prejudice).")
    @click.option("--confirm", default=2, show_default=True,
                  help="As `coalora search --confirm`: measure the best N candidates, the best archived one, "
                       "the largest llama.cpp file that fits (uniform or a llama-quantize mix) and the other one of "
                       "least quantization error, each with its generated adapter and the shared LoRA; another "
                       "candidate replaces the largest file only when better by two standard errors and 0.005 nats "
                       "per token, each with the adapter it keeps (the generated one only when it beats the shared "
                       "LoRA by the same margins, or has a lower loss and a KL divergence from the F32 model with "
                       "the shared LoRA lower by two standard errors), or when its loss is lower and its KL "
                       "divergence from the F32 model with the shared LoRA lower by two standard errors and by a "
                       "quarter of the file's or 0.005 nats, whichever is less; all "
                       "are measured again on twice the windows when one is ahead by between one and two (0: the "
                       "surrogate's pick, unmeasured).")
    @click.option("--confirm-windows", default=16, show_default=True,
                  help="Held-out windows of the training data each confirmation candidate is measured on.")
    @click.option("--json", "as_json", is_flag=True)
    def emit_cmd(run_dir, profile, out, n_windows, data, confirm, confirm_windows, as_json):
        """Emit the best model + adapter pair within each profile's budget into DIST/NAME/."""
        from rich.table import Table

        from toolkit.emit import emit
        from toolkit.profiles import list_profiles, load_profile
        from toolkit.run import Run

        if n_windows < 1 or confirm_windows < 1:
            raise CoaloraError("--windows and --confirm-windows must be at least 1")
        if confirm < 0:
            raise CoaloraError("--confirm must not be negative")
        run = Run.open(run_dir)
        profs = list_profiles() if profile == "all" else [load_profile(profile)]
        manifests = []
        status, log = _status(console(stderr=True))
        with status:
            for p in profs:
                manifests.append(emit(run, p, out, n_windows=n_windows, text_path=data, log=log, confirm=confirm,
                                      confirm_windows=confirm_windows))
        if as_json:
            click.echo(json.dumps(manifests if profile == "all" else manifests[0], indent=2))
            return
        t = Table(title=f"emitted into {out}")
        for col in ("profile", "budget", "model", "adapter", "bpw", "chosen", "pred. ppl", "pred. memory", "fits"):
            t.add_column(col)
        for m in manifests:
            ok = all(m["fits"].values())
            t.add_row(m["profile"]["name"], _mb(m["search"]["budget_bytes"]), _mb(m["files"]["model.gguf"]["bytes"]),
                      _mb(m["files"]["adapter.gguf"]["bytes"]), f"{m['search']['bits_per_weight']:.2f}",
                      m["search"]["source"], f"{m['evaluation']['predicted_perplexity']:.3f}",
                      _mib(m["memory"]["total_bytes"]), "yes" if ok else "[red]no[/red]")
        console().print(t)
        from toolkit.cmd_search import confirmation_table

        for m in manifests:
            if m["search"].get("confirmation"):
                tab = confirmation_table(m["search"]["confirmation"])
                tab.title = f"{m['profile']['name']}: {tab.title}"
                console().print(tab)

    @cli.command("validate")
    @click.argument("dist", type=click.Path(path_type=Path))
    @click.option("--data", type=click.Path(path_type=Path), help="Evaluate on this text instead of the manifest's.")
    @click.option("--windows", "n_windows", type=ranges.WINDOWS, help="Number of evaluation windows (default: the manifest's).")
    @click.option("--reference", type=click.Path(path_type=Path), help="Unquantized F16/F32 GGUF to compare with.")
    @click.option("--no-measure", is_flag=True, help="Skip the speed / peak-memory measurement.")
    @click.option("--measure-tokens", type=ranges.TOKENS, help="Prompt tokens of the measurement (default: fill the context).")
    @click.option("--threads", type=ranges.THREADS, help="Threads for llama.cpp (default: the profile's).")
    @click.option("--json", "as_json", is_flag=True)
    def validate_cmd(dist, data, n_windows, reference, no_measure, measure_tokens, threads, as_json):
        """Check an emitted pair on CPU: checksums, adapter, perplexity, KL, speed, memory."""
        from rich.table import Table

        from toolkit.validate import validate

        for opt, v in (("--windows", n_windows), ("--measure-tokens", measure_tokens), ("--threads", threads)):
            if v is not None and v < 1:
                raise CoaloraError(f"{opt} must be at least 1")
        status, log = _status(console(stderr=True))
        with status:
            r = validate(dist, data=data, n_windows=n_windows, reference=reference, measure_memory=not no_measure,
                         threads=threads, measure_tokens=measure_tokens, log=log)
        if as_json:
            click.echo(json.dumps(r, indent=2))
        else:
            ev, mem, sp, ref = r["evaluation"], r["memory"], r["speed"], r["reference"]
            t = Table(title=f"validation of {dist} ({r['profile']})", show_header=False)
            t.add_column("what")
            t.add_column("value")
            t.add_row("perplexity (no adapter)", f"{ev['perplexity_base']:.3f}")
            t.add_row("perplexity (adapter)", f"{ev['perplexity_adapter']:.3f}")
            t.add_row("predicted perplexity", f"{ev['predicted_perplexity']:.3f} ({ev['relative_difference']:+.3%}, "
                      f"{ev['scored_tokens']:,} tokens scored)")
            if ref:
                for k in ("base", "adapter"):
                    t.add_row(f"KL / top-1 vs F16 ({k})",
                              f"{ref[k]['kl_mean']:.4f} nats / {ref[k]['top1_agreement']:.1%}")
            t.add_row("memory predicted / allowed", f"{_mib(mem['predicted_total_bytes'])} / {_mib(mem['allowed_bytes'])}")
            t.add_row("peak RSS measured", _mib(mem["measured_peak_rss_bytes"]))
            if sp:
                t.add_row("prompt / generation", f"{sp['prompt_tokens_per_s']:.0f} / {sp['gen_tokens_per_s']:.1f} tok/s")
            for k, v in r["verdicts"].items():
                t.add_row(k, "skipped" if v is None else ("[green]pass[/green]" if v else "[red]FAIL[/red]"))
            console().print(t)
        if not r["ok"]:
            failed = [k for k, v in r["verdicts"].items() if v is False]
            raise CoaloraError(f"validation failed: {', '.join(failed)}")

    @cli.command("package")
    @click.argument("dist", type=click.Path(path_type=Path))
    @click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="NAME.tar.gz")
    def package_cmd(dist, out):
        """Pack the pair, its manifest and a device README into one .tar.gz."""
        from toolkit.package import package

        p = package(dist, out)
        console().print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
