"""benchmarks/studies/find_lr/evaluate.py (``python -m benchmarks.studies.find_lr.evaluate``) end to end in its --quick mode (tiny width32 task, one seed, a few steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_evaluation_runs_end_to_end_and_resumes(tmp_path):
    pytest.importorskip("peft")
    cmd = [sys.executable, "-m", "benchmarks.studies.find_lr.evaluate", "--quick", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "width32.json").read_text())
    assert data["meta"]["command"] and data["meta"]["versions"] and data["meta"]["quick"] is True
    (run,) = data["runs"]
    assert run["seed"] == 0 and run["steps_used"] <= 60 and run["ratio"] in (1, 4)
    assert "<- chosen" in run["explain"]
    summary = data["summary"]
    assert summary["probe_fraction_of_one_run"] == pytest.approx(run["steps_used"] / 4)
    assert 0 < summary["probe_fraction_of_sweep"] < 1  # against the committed width32 sweep
    # the paired difference is against seed 0 of the committed sweep at its validation-best lr
    from benchmarks.common import stats

    runs = json.loads((ROOT / "benchmarks/studies/v2/results/width32__lora.json").read_text())["runs"]
    best = stats.select(runs).best_lr
    ref = next(r["test_loss"] for r in runs if r["lr"] == best and r["seed"] == 0 and not r.get("extra"))
    assert summary["vs_best_lora"]["lr"] == best
    assert summary["vs_best_lora"]["diffs"] == [pytest.approx(run["test_loss"] - ref)]
    assert summary["vs_best_loraplus"]["n"] == 1 and summary["vs_best_loraplus"]["ratio"] > 1
    # resumable: a second call skips the seed already done
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(json.loads((tmp_path / "results" / "width32.json").read_text())["runs"]) == 1
