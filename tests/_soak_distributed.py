"""Run every multi-rank test N times in a row on a busy machine and record each run's outcome.

    python tests/_soak_distributed.py --runs 20 --burn 1 --out benchmarks/results/distributed_soak.json

Each run is one ``python -m pytest`` of the multi-rank tests (:data:`TESTS`). ``--burn K`` keeps K
extra processes spinning on the CPU for the whole soak, so the ranks run while the machine is busy
with another job. The JSON is rewritten after every run (a soak cut short keeps what it did): the
commit, the command, each run's outcome, pytest's counts, its wall time, the 1-minute load average
before and after, and whether the output shows an abort (``terminate called``, a negative exit code).
Not collected by pytest (no ``test_`` prefix); it runs the tests, it is not one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The tests that start more than one gloo rank.
TESTS = (
    "tests/test_optimizers.py::test_zero_redundancy_optimizer_on_two_ranks_matches_single_process",
    "tests/test_distributed.py",
    "tests/test_apply_distributed.py",
    "tests/test_deepspeed.py",
)

_ABORT = re.compile(r"terminate called|exit codes \[[^\]]*-\d|SIGABRT|core dumped")
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped)")


def _burn(until: float) -> None:
    x = 0
    while time.time() < until:
        x += 1


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _provenance(argv: list[str]) -> dict[str, object]:
    # the record benchmarks/common/provenance.py writes, without importing benchmarks/ (this runs as a script)
    from loraplus._demo._provenance import record

    return record("python " + shlex.join(["tests/_soak_distributed.py", *argv]), ROOT)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _one_run(index: int, timeout_s: float) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"]
    load_before = os.getloadavg()[0]
    started = _now()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}{err.stderr or ''}\n(timed out after {timeout_s} s)", None
    wall = time.monotonic() - t0
    last = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _COUNTS.findall(last)}
    return {
        "run": index,
        "started": started,
        "commit": _git("rev-parse", "HEAD"),
        "outcome": "passed" if code == 0 else "failed",
        "returncode": code,
        "counts": counts,
        "abort_seen": bool(_ABORT.search(output)),
        "wall_s": round(wall, 1),
        "load1_before": round(load_before, 2),
        "load1_after": round(os.getloadavg()[0], 2),
        "summary": last,
        "output_tail": None if code == 0 else output[-4000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burn", type=int, default=1, help="extra CPU-burning processes during the soak")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed_soak.json")
    args = parser.parse_args()

    burners = [
        multiprocessing.Process(target=_burn, args=(time.time() + args.runs * args.timeout,), daemon=True)
        for _ in range(args.burn)
    ]
    for b in burners:
        b.start()
    report: dict[str, object] = {
        "what": "consecutive runs of every multi-rank test (tests/_soak_distributed.py)",
        "tests": list(TESTS),
        "command": f"python tests/_soak_distributed.py --runs {args.runs} --burn {args.burn}",
        "commit_at_start": _git("rev-parse", "HEAD"),
        "worktree_dirty_at_start": bool(_git("status", "--porcelain")),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "cpus": os.cpu_count(),
        "burners": args.burn,
        "started": _now(),
        # the shared record every result carries (commit, dirty flag, versions, machine), taken at the start
        "provenance": _provenance(["--runs", str(args.runs), "--burn", str(args.burn)]),
        "runs": [],
    }
    runs: list[dict[str, object]] = []
    try:
        for i in range(args.runs):
            runs.append(_one_run(i, args.timeout))
            passed = sum(r["outcome"] == "passed" for r in runs)
            report.update(runs=runs, finished=_now(), passed=passed, failed=len(runs) - passed,
                          aborts=sum(bool(r["abort_seen"]) for r in runs))  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"run {i}: {runs[-1]['outcome']} ({runs[-1]['summary']}), load {runs[-1]['load1_before']}", flush=True)
    finally:
        for b in burners:
            b.terminate()


if __name__ == "__main__":
    main()
