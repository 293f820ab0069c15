"""`coalora search RUN`: the best configuration of a trained run within a byte budget."""
from __future__ import annotations

import json

import click

from converters.errors import CoaloraError
from toolkit import cmd_options as ranges


def _budget(run, budget_bytes, bpw, profile):
    """(budget bytes, what it came from, layout to search: a profile's avoided types are off the menu)."""
    from toolkit.sensitivity import bytes_for_bpw

    given = [x is not None for x in (budget_bytes, bpw, profile)]
    if sum(given) != 1:
        raise CoaloraError("give exactly one of --budget-bytes, --bpw, --profile")
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise CoaloraError("--budget-bytes must be positive")
        return budget_bytes, f"{budget_bytes:,} bytes", run.layout
    if bpw is not None:
        if not 0 < bpw <= 32:
            raise CoaloraError("--bpw must be in (0, 32]")
        return bytes_for_bpw(run.layout, bpw), f"{bpw:g} bits per weight", run.layout
    from toolkit.profiles import load_profile, plan_run_budget

    p = load_profile(profile)
    plan = plan_run_budget(p, run.meta, run.layout)
    return plan.budget_bytes, f"profile {p.name}", plan.layout


def register(cli):
    @cli.command("search")
    @click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
    @click.option("--budget-bytes", type=ranges.BUDGET_BYTES, default=None, help="Largest model file, in bytes.")
    @click.option("--bpw", type=ranges.BPW, default=None, help="Largest bits per weight of the quantized tensors.")
    @click.option("--profile", default=None, help="Device profile (name or TOML path) giving the model budget.")
    @click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                  help="Write the configuration JSON here.")
    @click.option("--confirm", type=ranges.CONFIRM, default=0, show_default=True,
                  help="Measure the best N candidates (plus the best archived one, the largest llama.cpp file "
                       "that fits: a uniform type or a llama-quantize mix such as Q4_K_M, and the other one of least "
                       "quantization error) with the run's model, each with its generated adapter and with the "
                       "shared LoRA (about 8 s each on 2 cores); each keeps its generated adapter only when it is "
                       "better than the shared LoRA by two standard errors and 0.005 nats per token, or when its "
                       "loss is lower and its KL divergence from the F32 model with the shared LoRA lower by two "
                       "standard errors (fidelity), and another "
                       "candidate, with the adapter it keeps, replaces the largest file only when better by two "
                       "standard errors of the per-window difference and 0.005 nats, or when its loss is lower "
                       "and its KL divergence from the F32 model with the shared LoRA, each with the adapter it "
                       "keeps, lower by two standard errors and by a quarter of the file's or 0.005 nats, "
                       "whichever is less (fidelity: with none better on loss alone, the one of least KL is "
                       "picked); when one is ahead by between "
                       "one and two with a gain within one standard error of 0.005 or above, all are measured "
                       "again on twice the windows.")
    @click.option("--confirm-windows", type=ranges.WINDOWS, default=32, show_default=True,
                  help="Held-out windows of the training text each confirmation is measured on.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    def search_cmd(run_dir, budget_bytes, bpw, profile, output, confirm, confirm_windows, as_json):
        """Best quantization configuration of RUN within a budget (exact file bytes, never over)."""
        from toolkit.budget_search import search_run

        if sum(x is not None for x in (budget_bytes, bpw, profile)) != 1:
            raise CoaloraError("give exactly one of --budget-bytes, --bpw, --profile")
        if confirm < 0 or confirm_windows < 1:
            raise CoaloraError("--confirm must not be negative and --confirm-windows must be at least 1")
        try:
            from toolkit.run import Run
        except ImportError:
            raise CoaloraError("training runs are not available in this installation") from None
        run = Run.open(run_dir)
        budget, what, layout = _budget(run, budget_bytes, bpw, profile)
        res = search_run(run, layout, budget, confirm, confirm_windows)
        if output:
            res.cfg.save(output, extra=res.extra())
        out = {"run": str(run.path), "budget": what, **res.extra(), "types": res.cfg.histogram(),
               "output": output}
        if as_json:
            click.echo(json.dumps(out, indent=2))
            return
        from toolkit.console import console
        from rich.table import Table

        t = Table(title=f"coalora search: {run.path} ({what})", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        fmt = lambda v: "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4f}")  # noqa: E731
        for k in ("budget_bytes", "file_bytes", "bpw", "predicted_loss", "predicted_ppl", "measured_loss"):
            t.add_row(k.replace("_", " "), fmt(out[k]))
        t.add_row("source", res.source)
        t.add_row("adapter", out["adapter"] + ("" if res.adjusted else " LoRA (generated one not measurably better)"))
        t.add_row("types", ", ".join(f"{k}×{v}" for k, v in out["types"].items()))
        if output:
            t.add_row("written", output)
        console().print(t)
        if res.confirmation:
            console().print(confirmation_table(res.confirmation))


def confirmation_table(conf: dict):
    """What a confirmation measured: each candidate's held-out loss and its paired difference to the largest
    llama.cpp file that fits (uniform type or llama-quantize mix; shared by search and emit)."""
    from rich.table import Table

    uniform = f"llama.cpp's {conf['uniform']} file" if conf["uniform"] else "the largest llama.cpp file (none fits)"
    more = (f" (measured again after {conf['extended_from_windows']}: a candidate was ahead by less)"
            if conf.get("extended_from_windows") else "")
    kl = any("kl" in r for r in conf["candidates"])
    t = Table(title=f"confirmation on {conf['windows']} held-out windows{more}: a mix replaces {uniform} only "
                    f"when better by {conf['z']:g} standard errors"
                    + (f" and {conf['min_gain']:g} nats" if conf.get("min_gain") else "")
                    + (f", or lower loss and KL from F32 lower by as many and by {conf.get('fidelity_share', 0):.0%} "
                       f"of the file's or {conf.get('min_gain', 0):g} nats, whichever is less (fidelity; of those, "
                       f"the least KL when none is better on loss alone)" if kl else ""))
    for col in ("candidate", "file bytes", "bpw", "adapter", "held-out loss", f"vs {conf['uniform'] or '-'}",
                *(("KL from F32", "KL vs it") if kl else ()), "picked"):
        t.add_column(col)

    def diff(d, se, digits=4):
        return "-" if d is None else f"{d:+.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")

    for r in conf["candidates"]:
        kl_cells = ()
        if kl:  # each with the adapter it keeps, from F32 with the shared LoRA (older results: shared rows only)
            kl_cells = ((f"{r['kl']:.5f}", diff(r["kl_vs_uniform"], r["kl_vs_uniform_se"], 5)) if "kl" in r
                        else ("-", "-"))
        t.add_row(r["source"], f"{r['file_bytes']:,}", f"{r['bpw']:.3f}", r.get("adapter", "generated"),
                  f"{r['measured_loss']:.4f}", diff(r.get("vs_uniform"), r.get("vs_uniform_se")), *kl_cells,
                  ("yes" if r["picked"] else "") + (" (fidelity)" if r.get("fidelity") and r["picked"] else ""))
    a = conf.get("adapter")
    if a:
        se = "" if a["vs_shared_se"] is None else f" ± {a['vs_shared_se']:.4f}"
        kl_d = ("" if "kl_vs_shared" not in a else f", KL {diff(a['kl_vs_shared'], a['kl_vs_shared_se'], 5)}"
                + (" (fidelity rule met)" if a.get("fidelity") else ""))
        t.caption = (f"each candidate with the adapter it keeps; the pick's generated adapter vs the shared LoRA: "
                     f"{a['vs_shared']:+.4f}{se}{kl_d} -> {'generated adapter' if a['generated'] else 'shared LoRA'}")
    return t
