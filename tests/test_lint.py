"""ruff and mypy (versions pinned in the ``test`` extra) run as tests, so ``.ci/run`` checks them."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_is_clean():
    pytest.importorskip("ruff")
    res = _run("ruff", "check", "--no-cache", "loraplus", "tests", "benchmarks")
    assert res.returncode == 0, f"ruff check found problems:\n{res.stdout}{res.stderr}"


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    with tempfile.TemporaryDirectory() as cache:  # pytest runs with -p no:cacheprovider; keep the tree clean
        res = _run("mypy", "--cache-dir", cache, "loraplus")
    assert res.returncode == 0, f"mypy found problems:\n{res.stdout}{res.stderr}"
