"""Does every profile's emitted pick hold its own against the largest uniform file that fits? (issue 19)

For each profile folder of a `coalora demo` (or `coalora emit`) output, this emits the largest uniform type
that fits the profile's budget from the same run (a copy of the profile that avoids every other type of the
run's menu, `--confirm 0`), then measures both pairs with llama.cpp (`coalora validate --no-measure
--windows W`) on the same first W windows of 512 tokens of Pride and Prejudice. Writes
bench/results/demo_uniform.{md,json}.

    python bench/demo_uniform.py --demo coalora-demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, cli, markdown_table, toml_text, write_results  # noqa: E402


def uniform_profile(profile: dict, keep: str, menu: list[str], path: Path) -> str:
    """A copy of ``profile`` (a manifest's: its profile keys, without what emit added) whose menu is the one type
    ``keep``: written to ``path``; returns its name."""
    from toolkit.profiles import FIELDS

    name = f"{profile['name']}-uniform-{keep.lower()}"
    d = {k: v for k, v in profile.items() if k in FIELDS}
    d.update(name=name, description=f"{profile['description']} (uniform {keep} only)", prefer=[keep],
             avoid=[t for t in menu if t != keep])
    path.write_text(toml_text(d))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="A `coalora demo -o` folder (run/ and dist/).")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "demo_uniform")
    ap.add_argument("--windows", type=int, default=16, help="Pride and Prejudice windows of 512 tokens.")
    ap.add_argument("--note", default="", help="A sentence about the run, added to the result.")
    args = ap.parse_args()
    run, dist = args.demo / "run", args.demo / "dist"
    menu = json.loads((run / "run.json").read_text())["layout"]["menu"]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in sorted(p for p in dist.iterdir() if (p / "manifest.json").is_file()):
        m = json.loads((folder / "manifest.json").read_text())
        conf = m["search"]["confirmation"] or {}
        uniform = conf.get("uniform")
        pick = cli("validate", folder, "--no-measure", "--windows", args.windows, "--json", check=False)[0]
        row = {"profile": folder.name, "budget_bytes": m["search"]["budget_bytes"],
               "pick": m["search"]["source"], "pick_bytes": m["files"]["model.gguf"]["bytes"],
               "pick_bpw": m["search"]["bits_per_weight"],
               "pick_ppl": pick["evaluation"]["perplexity_adapter"] if isinstance(pick, dict) else None,
               "uniform": uniform, "uniform_bytes": None, "uniform_ppl": None}
        if uniform and m["search"]["source"] == f"uniform:{uniform}":  # the pick is that very file
            row.update(uniform_bytes=row["pick_bytes"], uniform_ppl=row["pick_ppl"])
        elif uniform:
            toml = args.work / f"{folder.name}-uniform.toml"
            name = uniform_profile(m["profile"], uniform, menu, toml)
            wd = args.work / "dist"
            cli("emit", run, "--profile", toml, "-o", wd, "--windows", m["evaluation"]["n_windows"],
                "--confirm", 0, "--json")
            u = cli("validate", wd / name, "--no-measure", "--windows", args.windows, "--json", check=False)[0]
            um = json.loads((wd / name / "manifest.json").read_text())
            row.update(uniform_bytes=um["files"]["model.gguf"]["bytes"],
                       uniform_ppl=u["evaluation"]["perplexity_adapter"] if isinstance(u, dict) else None)
        if row["pick_ppl"] is not None and row["uniform_ppl"] is not None:
            row["pick_vs_uniform"] = row["pick_ppl"] / row["uniform_ppl"] - 1
            row["holds"] = row["pick_ppl"] <= row["uniform_ppl"]
        rows.append(row)
    md = (f"Each profile's pick from `{args.demo}` against the largest uniform file that fits its budget, both with "
          f"their generated adapters from the same run; llama.cpp perplexity on {args.windows} x 512 tokens of Pride "
          f"and Prejudice (`coalora validate --no-measure`)." + (f" {args.note}" if args.note else "") + "\n\n"
          + markdown_table(rows, [("profile", "profile"), ("budget_bytes", "budget (bytes)"), ("pick", "pick"),
                                  ("pick_bytes", "pick bytes"), ("pick_ppl", "pick + adapter"),
                                  ("uniform", "largest uniform"), ("uniform_bytes", "uniform bytes"),
                                  ("uniform_ppl", "uniform + adapter"), ("pick_vs_uniform", "pick vs uniform"),
                                  ("holds", "pick <= uniform")]))
    write_results("demo_uniform", {"demo": str(args.demo), "rows": rows}, md)


if __name__ == "__main__":
    main()
