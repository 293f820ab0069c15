"""Configuration search on SmolLM2: EHVI Pareto search vs random search vs a uniform-type ladder.

All methods get real evaluations of the same objective, and the hypervolume of each method's
(bpw, loss) front is measured against ONE reference point shared by all methods:
bpw = the upper edge of the searched range + one 0.25-bit bin, loss = the worst loss any method saw
+ 10% of the loss range. Points outside the box (e.g. the F16 rung of the ladder) add nothing.

Objective: if ``--run RUN`` names a trained coalora run, its ``calibration_loss`` (the
configuration-aware adapter's loss). Otherwise a documented PROXY: the causal-LM loss of the
quantized model WITHOUT adapter (every linear weight replaced by the dequantized llama.cpp ggml
bytes of its type) on a held-out Pride and Prejudice batch. The output says which.

Methods, each with the same number of evaluations N (the ladder has as many as there are
distinct uniform configurations; the others are also reported after that many evaluations):
  ladder      layout.uniform(t) for every menu type t
  random      configurations drawn uniformly from the per-tensor menus (F16 excluded)
  random-pool same seed set as ehvi, then picks drawn at random from the same candidate pools
  ehvi        seed set (greedy sensitivity allocations spread over the range), then rounds of
              qLogEHVI picks from the candidate pool (toolkit.pareto_search.refine)

Usage: .venv/bin/python bench/search.py [--n 24] [--round 8] [--run RUN]
Writes bench/results/search.json and bench/results/search.md.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit import assets  # noqa: E402
from converters.configuration import Configuration, ModelLayout  # noqa: E402
from bench.common import provenance  # noqa: E402
from converters.fileio import sha256_file, write_json, write_text  # noqa: E402
from toolkit.pareto_search import (Archive, hypervolume, make_candidate_pool, non_dominated,  # noqa: E402
                                   plot_pareto, per_bin_fronts, refine)
from toolkit.sensitivity import error_table, initial_training_set  # noqa: E402
from toolkit.run import env_threads  # noqa: E402

BPW_LO, BPW_HI = 4.25, 8.75      # the range searched: IQ4_NL/Q4_0 ... Q8_0 (F16 is no edge target)


class ProxyObjective:
    """Loss of the quantized model, no adapter, on a held-out batch (windows of Pride and Prejudice)."""

    description = ("proxy: causal-LM loss of the ggml-quantized SmolLM2 without adapter on 4 held-out "
                   "Pride and Prejudice windows of 256 tokens")

    def __init__(self, lm, n_windows: int = 4, n_ctx: int = 256):
        from toolkit.evaluation import eval_windows, model_bos
        from toolkit.weight_bank import WeightBank

        self.lm = lm
        cache = assets.home() / "quant-cache" / sha256_file(lm.source)[:16]
        self.bank = WeightBank(lm, cache, ram_limit_bytes=3 << 30)
        text = assets.novel_path(assets.EVAL_NOVEL).read_text()
        self.ids = torch.tensor(eval_windows(lm.tokenizer, text[len(text) // 2:], n_windows, n_ctx,
                                             bos=model_bos(lm.tokenizer)))
        self.params = dict(lm.model.named_parameters())
        self.calls = 0

    @torch.no_grad()
    def __call__(self, cfgs: list[Configuration]) -> list[float]:
        out = []
        for c in cfgs:
            for n, q in c.types.items():
                self.params[self.lm.hf_name(n)].data.copy_(self.bank.weight(n, q))
            out.append(float(self.lm.model(self.ids, labels=self.ids).loss))
            self.calls += 1
        return out

    def reset(self) -> None:
        """Nothing is cached between calls."""


class RunObjective:
    def __init__(self, run):
        self.run, self.calls = run, 0
        self.description = f"real: calibration_loss of the trained run {run.path} (configuration-aware adapter)"

    def __call__(self, cfgs):
        self.calls += len(cfgs)
        return list(self.run.calibration_loss(list(cfgs), divergence=False))

    def reset(self) -> None:
        """Each method measures its own configurations (the run caches them: a later method would be timed on
        the earlier ones' measurements)."""
        self.run.forget_measurements()


def no_f16(layout: ModelLayout) -> ModelLayout:
    return layout.with_menu(m for m in layout.menu_names if m not in ("F16", "F32", "BF16"))


def ladder(layout, full_layout, objective) -> Archive:
    cfgs = list(dict.fromkeys(full_layout.uniform(t) for t in full_layout.menu_names))
    a = Archive()
    a.add(full_layout, cfgs, objective(cfgs))
    return a


def random_search(layout, objective, n, seed) -> Archive:
    rng = random.Random(seed)
    cfgs = []
    while len(cfgs) < n:
        c = Configuration({name: rng.choice(layout.menu(name)) for name in layout.names()})
        if BPW_LO - 0.25 <= layout.bits_per_weight(c) <= BPW_HI and c not in cfgs:
            cfgs.append(c)
    a = Archive()
    for k in range(0, n, 8):  # rounds of 8, like the others
        a.add(layout, cfgs[k:k + 8], objective(cfgs[k:k + 8]), round=k // 8)
    return a


def seed_set(layout, errors, n_seed):
    return initial_training_set(layout, errors, BPW_LO, BPW_HI, bin_width=(BPW_HI - BPW_LO) / n_seed)[:n_seed]


def pool_search(layout, objective, errors, n, n_round, seed, use_ehvi: bool) -> Archive:
    a = Archive()
    init = seed_set(layout, errors, n_round)
    a.add(layout, init, objective(init), round=0)
    r = 1
    while len(a) < n:
        k = min(n_round, n - len(a))
        pool = make_candidate_pool(layout, a, 300, seed + r, errors, (BPW_LO - 0.25, BPW_HI))
        if use_ehvi:
            a, _ = refine(layout, a, objective, n_new=k, seed=seed + r, candidate_pool=pool, errors=errors,
                          round_index=r)
        else:
            picks = random.Random(seed + r).sample(pool, k)
            a.add(layout, picks, objective(picks), round=r)
        r += 1
    return a


def hv_curve(a: Archive, ref, counts) -> dict:
    pts = a.points()
    return {int(c): hypervolume(pts[:c], ref) for c in counts if c <= len(pts)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="evaluations per method")
    ap.add_argument("--round", type=int, default=8, help="evaluations per search round (and seed-set size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default=None, help="a trained coalora run: use its calibration_loss")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    from converters.model_loading import load_model

    t0 = time.time()
    if args.run:
        from toolkit.run import Run
        run = Run.open(args.run)
        lm = run.loaded()
        objective = RunObjective(run)
        full_layout = run.layout
    else:
        lm = load_model(assets.require_smollm2())
        objective = ProxyObjective(lm)
        full_layout = lm.layout()
    layout = no_f16(full_layout)
    print(f"objective: {objective.description}")
    t = time.time()
    errors = error_table(layout, lm.gguf_weight, cache=assets.home() / "bench" / "smollm2-sensitivity.json",
                         progress=True, imatrix=run.imatrix() if args.run else None,  # the IQ types need one
                         threads=env_threads())
    t_sens = time.time() - t

    results, archives, timing = {}, {}, {}
    for name, fn in [("ladder", lambda: ladder(layout, full_layout, objective)),
                     ("random", lambda: random_search(layout, objective, args.n, args.seed)),
                     ("random-pool", lambda: pool_search(layout, objective, errors, args.n, args.round, args.seed, False)),
                     ("ehvi", lambda: pool_search(layout, objective, errors, args.n, args.round, args.seed, True))]:
        objective.reset()
        t, c0 = time.time(), objective.calls
        archives[name] = fn()
        timing[name] = {"seconds": time.time() - t, "evaluations": objective.calls - c0}
        print(f"{name}: {timing[name]['evaluations']} evaluations, {timing[name]['seconds']:.0f} s", flush=True)

    allpts = np.vstack([a.points() for a in archives.values()])
    inrange = allpts[allpts[:, 0] <= BPW_HI + 0.25]
    span = float(inrange[:, 1].max() - inrange[:, 1].min()) or 1.0
    ref = np.array([BPW_HI + 0.25, inrange[:, 1].max() + 0.1 * span])
    n_ladder = len(archives["ladder"])
    counts = sorted({n_ladder, args.round, 2 * args.round, args.n})
    for name, a in archives.items():
        pts = a.points()
        front = pts[non_dominated(pts)]
        results[name] = {"evaluations": len(a), "hypervolume": hypervolume(pts, ref),
                         "hypervolume_at": hv_curve(a, ref, counts),
                         "front": sorted(front.tolist()), "per_bin_training_set": len(per_bin_fronts(a.records)),
                         "best_loss_at_bpw_le": {str(b): (min([l for x, l in pts if x <= b], default=None))
                                                 for b in (4.5, 5.0, 5.5, 6.0, 8.5)},
                         **timing[name]}
    out = {"provenance": provenance(), "model": str(lm.source), "objective": objective.description,
           "bpw_range": [BPW_LO, BPW_HI], "reference_point": {"bpw": ref[0], "loss": ref[1]},
           "evaluations_per_method": args.n, "round": args.round, "seed": args.seed,
           "sensitivity_seconds": t_sens, "total_seconds": time.time() - t0, "methods": results}
    outdir = Path(args.out)
    write_json(outdir / "search.json", out)
    plot_pareto(archives["ehvi"], [r.config() for r in per_bin_fronts(archives["ehvi"].records)],
                outdir / "search_ehvi.png", title="SmolLM2: EHVI search archive")

    head = "| method | evals | HV | " + " | ".join(f"HV@{c}" for c in counts) + " | best loss ≤4.5 / ≤5.0 / ≤6.0 bpw | s |"
    lines = ["# Configuration search on SmolLM2\n", f"Objective: {objective.description}.\n",
             f"Range {BPW_LO}-{BPW_HI} bpw; hypervolume reference point (bpw {ref[0]:.2f}, loss {ref[1]:.4f}), "
             f"shared by all methods.\n", head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name, r in results.items():
        b = r["best_loss_at_bpw_le"]
        lines.append(f"| {name} | {r['evaluations']} | {r['hypervolume']:.4f} | "
                     + " | ".join(fmt(r["hypervolume_at"].get(c)) for c in counts)
                     + f" | {fmt(b['4.5'])} / {fmt(b['5.0'])} / {fmt(b['6.0'])} | {r['seconds']:.0f} |")
    md = "\n".join(lines) + "\n"
    write_text(outdir / "search.md", md)
    print(md)
    return out


if __name__ == "__main__":
    main()
