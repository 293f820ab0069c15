"""The fuzz harness (bench/fuzz): its classifier catches each kind of finding, and a seeded CI sample of
about 200 damaged inputs gives no finding (bench/fuzz/run.py runs the full set)."""
from __future__ import annotations

import os
import signal


from bench.fuzz import run as fuzz
from bench.fuzz.cases import OK, Case


def _run(case, tmp_path):
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / fuzz.HOME).mkdir(parents=True, exist_ok=True)
    return fuzz.run_case(case, tmp_path, tmp_path / "logs")


def test_classifier_sees_every_kind_of_finding(tmp_path, monkeypatch):
    import toolkit.cli

    assert _run(Case("c/ok", "option", ["profiles", "--help"]), tmp_path)["outcome"] == "wrong_acceptance"
    assert _run(Case("c/acc", "option", ["profiles", "--help"], expect=OK, why="help"), tmp_path)["outcome"] == "accepted"
    assert _run(Case("c/clean", "option", ["profiles", "no-such"]), tmp_path)["outcome"] == "clean"
    assert _run(Case("c/usage", "option", ["profiles", "no-such"], usage_error=True), tmp_path)["outcome"] == "unclean"

    def crash(argv):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(toolkit.cli, "main", crash)
    assert _run(Case("c/tb", "option", ["x"]), tmp_path)["outcome"] == "traceback"
    monkeypatch.setattr(toolkit.cli, "main", lambda argv: os.kill(os.getpid(), signal.SIGABRT))
    assert _run(Case("c/abort", "option", ["x"]), tmp_path)["outcome"] == "signal"

    def litter(argv):
        (tmp_path / "litter.txt").write_text("x")
        return 1
    monkeypatch.setattr(toolkit.cli, "main", litter)
    assert _run(Case("c/files", "option", ["x"]), tmp_path)["outcome"] == "files"

    def pwned(argv):
        (tmp_path / "cases" / "CANARY").write_text("x")
        return 1
    (tmp_path / "cases").mkdir(exist_ok=True)
    monkeypatch.setattr(toolkit.cli, "main", pwned)
    assert _run(Case("c/pickle", "run", ["x"]), tmp_path)["outcome"] == "code_execution"

    def sleepy(argv):
        import time
        time.sleep(60)
    monkeypatch.setattr(toolkit.cli, "main", sleepy)
    assert _run(Case("c/hang", "option", ["x"], timeout_s=1), tmp_path)["outcome"] == "hang"


def test_generation_is_seeded(fuzz_workdir):
    a = [(c.name, c.argv) for c in fuzz.generate(3, 60, fuzz_workdir)]
    b = [(c.name, c.argv) for c in fuzz.generate(3, 60, fuzz_workdir)]
    assert a == b and len(a) > 30


# Cases of these kinds load a model or run llama.cpp (about a second or more each): CI runs a few,
# bench/fuzz/run.py all of them.
CI_CAPS = {"run": 14, "data": 4, "gguf": 20, "adapter": 8, "device": 12}


# The sample runs in a fresh interpreter: its cases are forks, and a fork of this pytest process, whose earlier
# tests started torch's OpenMP thread pool, can hang in its first parallel region.
SAMPLE = """
import json, sys
from pathlib import Path
from bench.fuzz import run as fuzz
wd, caps = Path(sys.argv[1]), json.loads(sys.argv[2])
cases, seen = [], {}
for c in fuzz.generate(seed=1, n=200, workdir=wd):
    seen[c.kind] = seen.get(c.kind, 0) + 1
    if seen[c.kind] <= caps.get(c.kind, 10**6):
        cases.append(c)
rows = fuzz.run_all(cases, wd, progress=False)
print(json.dumps([{k: r[k] for k in ("kind", "name", "outcome", "evidence")} for r in rows]))
"""


def test_fuzz_sample_has_no_finding(fuzz_workdir):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", SAMPLE, str(fuzz_workdir), json.dumps(CI_CAPS)], cwd=root,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    findings = [f"{r['outcome']} {r['name']}: {r['evidence']}" for r in rows if r["outcome"] in fuzz.FINDINGS]
    assert not findings, "\n".join(findings)
    kinds = {r["kind"] for r in rows}
    assert {"configuration", "profile", "option", "run", "data"} <= kinds
    assert sum(r["outcome"] == "clean" for r in rows) > 0.8 * len(rows)
