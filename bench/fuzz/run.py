"""Run the fuzz cases and classify every outcome.

    python -m bench.fuzz.run --seed 0 --n 1200            # the full set -> bench/results/fuzz.{json,md}
    python -m bench.fuzz.run --n 60 --kinds profile,option --no-save

Each case is ``coalora ARGV`` with ``$COALORA_HOME`` inside the work folder. Cases run in a fork of this
process after it has imported coalora (the same ``toolkit.cli.main`` the ``coalora`` script calls, without
paying torch's import per case), or with ``Case.isolate`` in a fresh interpreter. Outcomes:

- ``clean``: exit != 0 with the last stderr line a bounded ``coalora: error: ...`` or a click usage error
- ``accepted``: exit 0 where the case documents an acceptance
- ``unclean``: exit != 0 without that line (a message over several lines, unbounded, unprefixed)
- ``traceback``, ``signal`` (killed by a signal: an abort in llama.cpp, a segfault), ``hang`` (over the
  case's time limit), ``memory`` (over 2 GiB resident)
- ``wrong_acceptance``: exit 0 where an error was expected; ``wrong_refusal``: the reverse
- ``files``: a file outside the case's declared outputs and ``$COALORA_HOME`` appeared, changed or vanished
- ``code_execution``: the case's canary file was written (a crafted pickle ran)
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.fuzz.cases import ERROR, Case

ROOT = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 2 << 30
MAX_ERROR_LINE = 1000
FINDINGS = ("unclean", "traceback", "signal", "hang", "memory", "wrong_acceptance", "wrong_refusal", "files",
            "code_execution")
OUTCOMES = ("clean", "accepted", *FINDINGS)
# $COALORA_HOME sits deep inside the work folder, so a cache path climbing out of it with ../ is still
# inside the snapshot.
HOME = Path("h1/h2/h3/h4/h5/h6/home")


def generators() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("gen_*.py"))


def generate(seed: int, n: int, workdir: Path, kinds: set[str] | None = None) -> list[Case]:
    """About ``n`` cases, shared evenly by the generator modules (each gets its own seeded Random)."""
    for old in ("cases", "logs", HOME.parts[0]):  # a previous run's cases; the fixtures are kept
        shutil.rmtree(workdir / old, ignore_errors=True)
    mods = generators()
    cases: list[Case] = []
    for i, name in enumerate(mods):
        mod = importlib.import_module(f"bench.fuzz.{name}")
        share = n // len(mods) + (1 if i < n % len(mods) else 0)
        got = mod.cases(random.Random(f"{seed}/{name}"), workdir, share)
        cases += [c for c in got if kinds is None or c.kind in kinds]
    names = [c.name for c in cases]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        raise SystemExit(f"duplicate case names: {sorted(dup)[:5]}")
    return cases


# ---------------------------------------------------------------- file snapshots
def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == skip:
            dirnames[:] = []
            continue
        for f in filenames + [x for x in dirnames if (d / x).is_symlink()]:
            p = d / f
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
        out[str(d.relative_to(root)) + "/"] = ()
    return out


def file_changes(before: dict, after: dict, allowed: tuple[str, ...]) -> list[str]:
    def ok(p):
        return any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed)
    changes = [f"new {p}" for p in after if p not in before and not ok(p)]
    changes += [f"gone {p}" for p in before if p not in after and not ok(p)]
    changes += [f"changed {p}" for p in before if p in after and before[p] != after[p] and not ok(p)
                and not p.endswith("/")]
    return sorted(changes)


# ---------------------------------------------------------------- running one case
def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (llama.cpp child processes included)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _watch(pid: int, timeout: float, wait) -> tuple[int | None, str | None, int]:
    """Poll until ``wait()`` gives the exit status; kill the process group on a time or memory overrun.
    Returns (wait status or None, overrun kind, peak resident bytes)."""
    t0, peak, status, over, n = time.monotonic(), 0, None, None, 0
    while True:
        status = wait()
        if status is not None:
            return status, over, peak
        if n % 5 == 0:
            peak = max(peak, _tree_rss(pid))
        n += 1
        if over is None and (time.monotonic() - t0 > timeout or peak > MEMORY_LIMIT):
            over = "hang" if peak <= MEMORY_LIMIT else "memory"
            for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    target()
                except OSError:
                    pass
        time.sleep(0.02)


def _env(workdir: Path) -> dict:
    return {**os.environ, "COALORA_HOME": str(workdir / HOME), "PYTHONPATH": str(ROOT), "TERM": "dumb",
            "NO_COLOR": "1", "COLUMNS": "120", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "COALORA_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_forked(case: Case, workdir: Path, out: Path, err: Path) -> tuple[int | None, str | None, int]:
    """``toolkit.cli.main(argv)`` in a fork of this process (imports already paid)."""
    from toolkit.cli import main

    pid = os.fork()
    if pid == 0:  # child
        rc = 1
        try:
            import faulthandler

            faulthandler.disable()  # a crash is the parent's to classify, not pytest's to print
            os.setpgid(0, 0)
            os.environ.clear()
            os.environ.update(_env(workdir))
            os.chdir(workdir)
            fd_in = os.open(os.devnull, os.O_RDONLY)
            fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd_in, 0), os.dup2(fd_out, 1), os.dup2(fd_err, 2)
            # Python's streams on those descriptors (under pytest, sys.stderr is a capture buffer)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            rc = main(case.argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            rc = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)

    def wait():
        p, status = os.waitpid(pid, os.WNOHANG)
        return status if p else None
    return _watch(pid, case.timeout_s, wait)


def run_isolated(case: Case, workdir: Path, out: Path, err: Path) -> tuple[int | None, str | None, int]:
    """``python -m toolkit.cli ARGV`` in a fresh interpreter."""
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", *case.argv], cwd=workdir, env=_env(workdir),
                                stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True)

        def wait():
            p, status = os.waitpid(proc.pid, os.WNOHANG)
            if p:
                proc.returncode = 0  # reaped here; keep Popen from waiting again
                return status
            return None
        return _watch(proc.pid, case.timeout_s + 5, wait)  # + the interpreter's start


def classify(case: Case, status: int | None, over: str | None, peak: int, stderr: str, changes: list[str],
             canary: bool) -> tuple[str, int | None, str]:
    """(outcome, exit code or -signal, the evidence line)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    code = None if status is None else (os.waitstatus_to_exitcode(status))
    if canary:
        return "code_execution", code, "the canary file was written"
    if over:
        return over, code, f"killed after {case.timeout_s:.0f} s" if over == "hang" else f"{peak / 2**20:.0f} MiB"
    if code is not None and code < 0:
        return "signal", code, f"signal {signal.Signals(-code).name}"
    if "Traceback (most recent call last)" in stderr:
        return "traceback", code, last[:300]
    if peak > MEMORY_LIMIT:
        return "memory", code, f"{peak / 2**20:.0f} MiB"
    if changes:
        return "files", code, "; ".join(changes[:3])[:300]
    if code == 0:
        return ("wrong_acceptance", code, "exit 0") if case.expect == ERROR else ("accepted", code, "")
    if case.expect != ERROR:
        return "wrong_refusal", code, last[:300]
    usage = code == 2 and last.startswith("Error: ")
    if case.usage_error and not usage:
        return "unclean", code, "not a usage error: " + last[:280]
    if (last.startswith("coalora: error: ") or usage) and len(last) <= MAX_ERROR_LINE:
        return "clean", code, last[:300]
    return "unclean", code, last[:300]


def run_case(case: Case, workdir: Path, logs: Path) -> dict:
    home = workdir / HOME
    before = snapshot(workdir, skip=home)
    out, err = logs / "stdout", logs / "stderr"
    canary = workdir / "cases" / "CANARY"
    t0 = time.perf_counter()
    status, over, peak = (run_isolated if case.isolate else run_forked)(case, workdir, out, err)
    wall = time.perf_counter() - t0
    stderr = err.read_bytes().decode("utf-8", "replace")
    changes = file_changes(before, snapshot(workdir, skip=home), case.outputs + (str(logs.relative_to(workdir)),))
    hit = canary.exists()
    if hit:
        canary.unlink()
    outcome, code, evidence = classify(case, status, over, peak, stderr, changes, hit)
    return {"name": case.name, "kind": case.kind, "expect": case.expect, "outcome": outcome, "exit": code,
            "seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20), "evidence": evidence,
            **({"argv": case.argv, "stderr_tail": stderr[-1500:]} if outcome in FINDINGS else {})}


def preload() -> None:
    """Import what the commands import, once, before forking (so each case does not pay for it)."""
    import toolkit.cli  # noqa: F401
    for mod in ("torch", "transformers", "gguf", "llama_cpp", "toolkit.run", "toolkit.training", "toolkit.emit",
                "toolkit.validate", "converters.model_loading", "converters.gguf_model_writer", "datasets"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    import transformers
    for name in ("AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast", "LlamaForCausalLM"):
        getattr(transformers, name)  # transformers imports its model classes lazily, on first use


def run_all(cases: list[Case], workdir: Path, progress: bool = True) -> list[dict]:
    preload()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (workdir / HOME).mkdir(parents=True, exist_ok=True)
    it = cases
    if progress:
        from tqdm import tqdm
        it = tqdm(cases, desc="fuzz", unit="case")
    return [run_case(c, workdir, logs) for c in it]


def summarize(rows: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, collections.Counter] = {}
    for r in rows:
        table.setdefault(r["kind"], collections.Counter())[r["outcome"]] += 1
    total = collections.Counter()
    for c in table.values():
        total.update(c)
    table["all"] = total
    return {k: {o: v.get(o, 0) for o in OUTCOMES} | {"cases": sum(v.values())} for k, v in table.items()}


def markdown(summary: dict, meta: dict) -> str:
    from bench.common import markdown_table

    cols = [("kind", "kind"), ("cases", "cases"), *[(o, o.replace("_", " ")) for o in OUTCOMES]]
    rows = [{"kind": k, **v} for k, v in summary.items()]
    where = ("on a machine shared with other work (case seconds, and so hangs, are upper bounds)"
             if meta["machine_shared"] else "on an otherwise idle machine")
    return (f"# coalora fuzz run (seed {meta['seed']}, {summary['all']['cases']} cases)\n\n"
            + markdown_table(rows, cols)
            + "\n\nclean: a one-line `coalora: error:` or click usage error; accepted: exit 0 where the case "
              "documents the acceptance; every other column is a finding. Seed "
            + f"{meta['seed']}; the cases ran for {round(meta['run_seconds']):,} s {where}.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1200, help="cases to generate (shared by the generators)")
    ap.add_argument("--kinds", default="", help="comma-separated case kinds to keep (default: all)")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a fresh temporary one, removed after)")
    ap.add_argument("--no-save", action="store_true", help="print the table only")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--shared-machine", action="store_true", help="Record that other work shared the machine "
                    "(case seconds, and so the hang column, are then upper bounds).")
    a = ap.parse_args(argv)
    from bench.common import provenance, write_results

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="coalora-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cases = generate(a.seed, a.n, workdir, set(a.kinds.split(",")) if a.kinds else None)
    gen_s = time.perf_counter() - t0
    rows = run_all(cases, workdir)
    summary = summarize(rows)
    meta = {"seed": a.seed, "n": a.n, "kinds": a.kinds or "all", "generate_seconds": round(gen_s, 1),
            "run_seconds": round(time.perf_counter() - t0 - gen_s, 1), "machine_shared": a.shared_machine}
    payload = {"provenance": provenance(), **meta, "summary": summary,
               "findings": [r for r in rows if r["outcome"] in FINDINGS], "cases": rows}
    md = markdown(summary, meta)
    if a.no_save:
        print(md)
        for r in payload["findings"]:
            print(f"{r['outcome']:>16}  {r['name']}: {r['evidence']}")
    else:
        write_results("fuzz", payload, md, a.results_dir)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if payload["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
