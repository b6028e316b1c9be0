"""Part 1: ``pytest -m cuda`` in a subprocess, the outcome of every test read from its JUnit XML."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from . import ROOT
from ._context import Context

#: the files holding ``@pytest.mark.cuda`` tests (named, so pytest imports no other test module)
FILES = ("tests/test_cuda.py", "tests/test_find_lr.py", "tests/test_monitor.py")
#: a JUnit child element → the test's outcome
OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}


def outcomes(junit_xml: str) -> list[dict[str, Any]]:
    """One ``{"test", "outcome", "message"}`` per test case of a JUnit XML report."""
    cases = []
    for case in ET.fromstring(junit_xml).iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", None
        for child in case:
            if child.tag in OUTCOMES:
                outcome, message = OUTCOMES[child.tag], child.get("message")
                break
        cases.append({"test": test, "outcome": outcome, "message": message,
                      "seconds": float(case.get("time", 0.0))})
    return cases


def run(ctx: Context) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *FILES, "-q", "-rs", "-p", "no:cacheprovider",
               "-o", "addopts=", "--continue-on-collection-errors", f"--junitxml={report}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        ctx.log("running " + " ".join(cmd[1:]))
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=max(1.0, ctx.left()))
            returncode: int | None = res.returncode
            output = res.stdout + res.stderr
        except subprocess.TimeoutExpired as err:
            returncode = None
            output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        if ctx.log_file is not None:
            ctx.log_file.write(output)
        cases = outcomes(report.read_text()) if report.exists() else []
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {"settings": {"command": "python " + " ".join(cmd[1:-1]), "files": list(FILES)},
            "results": {"returncode": returncode, "timed_out": returncode is None, "counts": counts,
                        "summary_line": tail, "tests": cases, "output_tail": output[-4000:]}}
