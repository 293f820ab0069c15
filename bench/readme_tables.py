"""The README's benchmark tables, generated from the result files in bench/results/.

In README.md, a block

    <!-- table:NAME -->
    ...
    <!-- /table -->

is bench/results/NAME.md (the table the benchmark script wrote together with NAME.json) followed by the
result's provenance: commit, exact command, date. A result file without provenance is refused. A block
``<!-- legacy:NAME -->`` holds a result of older code that has no provenance; such blocks belong under the
README's "Legacy results" heading and say so.

    python bench/readme_tables.py            # rewrite README.md's blocks
    python bench/readme_tables.py --check    # exit 1 when README.md is not what this script makes
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
LEGACY_HEADING = "### Legacy results"
PROVENANCE_KEYS = ("commit", "command", "date")
BLOCK = re.compile(r"<!-- (table|legacy):([\w-]+) -->\n(.*?)<!-- /table -->", re.S)
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")


class ResultError(Exception):
    """A result file that cannot back a README table."""


def load_result(name: str, results: Path | None = None, legacy: bool = False) -> dict:
    path = Path(results or RESULTS) / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ResultError(f"cannot read {path}: {e}") from None
    prov = data.get("provenance") if isinstance(data, dict) else None
    has = isinstance(prov, dict) and all(prov.get(k) for k in PROVENANCE_KEYS)
    if not legacy and not has:
        raise ResultError(f"{path} has no provenance ({', '.join(PROVENANCE_KEYS)}); re-run its benchmark script, "
                          f"or mark its README block legacy")
    if legacy and has:
        raise ResultError(f"{path} has provenance: make its README block <!-- table:{name} -->, not legacy")
    return data


def table_text(name: str, results: Path | None = None) -> str:
    """The script's own rendering (NAME.md), headings dropped (the README has its own)."""
    path = Path(results or RESULTS) / f"{name}.md"
    try:
        md = path.read_text()
    except FileNotFoundError:
        raise ResultError(f"{path} does not exist") from None
    return "\n".join(l for l in md.strip().splitlines() if not l.startswith("#")).strip()


def render(kind: str, name: str, results: Path | None = None) -> str:
    data = load_result(name, results, legacy=kind == "legacy")
    if kind == "legacy":
        note = (f"*Legacy result `bench/results/{name}.json`: measured by older code; no provenance (commit, command "
                f"and date not recorded).*")
    else:
        p = data["provenance"]
        dirty = " with uncommitted changes" if p.get("dirty") else ""
        note = f"*Result `bench/results/{name}.json`: `{p['command']}`, commit {p['commit'][:10]}{dirty}, {p['date']}.*"
    return f"{table_text(name, results)}\n\n{note}\n"


def generate(readme: str, results: Path | None = None) -> str:
    def block(m):
        kind, name = m.group(1), m.group(2)
        return f"<!-- {kind}:{name} -->\n{render(kind, name, results)}<!-- /table -->"
    return BLOCK.sub(block, readme)


def blocks(readme: str) -> list[tuple[str, str, str, int]]:
    """(kind, name, text, offset) of every generated block."""
    return [(m.group(1), m.group(2), m.group(3), m.start()) for m in BLOCK.finditer(readme)]


def _numbers(obj, out: list) -> list:
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, str):
        out.extend(float(t.replace(",", "")) for t in NUMBER.findall(obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _numbers(k, out)
            _numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers(v, out)
    return out


def missing_numbers(text: str, data: dict) -> list[str]:
    """Numbers in the table rows of ``text`` that no value of the result ``data`` gives at their precision."""
    values = _numbers(data, [])
    bad = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        for tok in NUMBER.findall(line):
            v = float(tok.replace(",", ""))
            decimals = len(tok.split(".")[1]) if "." in tok else 0
            tol = 0.5 * 10 ** -decimals + 1e-9
            if not any(math.isclose(v, x, abs_tol=tol) or abs(v - x) <= tol for x in values):
                bad.append(tok)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="Only check; exit 1 when README.md differs.")
    args = ap.parse_args(argv)
    readme = README.read_text()
    try:
        new = generate(readme)
    except ResultError as e:
        print(f"readme_tables: error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if new != readme:
            print("readme_tables: README.md's tables differ from bench/results; run python bench/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != readme:
        from converters.fileio import write_text

        write_text(README, new)
    print(f"README.md: {len(blocks(new))} tables from bench/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
