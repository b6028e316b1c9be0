"""benchmarks/studies/find_lr/compare.py: the peers' rules on hand-computed curves, and the harness end to
end in its --quick mode (the demo's task made tiny, one seed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = "benchmarks.studies.find_lr.compare"


@pytest.fixture(scope="module")
def compare():
    from benchmarks.studies.find_lr import compare as mod

    return mod


def test_valley_is_halfway_into_the_longest_falling_run(compare):
    lrs = [10.0 * k for k in range(7)]
    # longest strictly falling subsequence: 5, 4, 3, 2, 1 at indices 0, 1, 3, 4, 6 (length 5); fastai
    # records it as ending at 6 and starting 5 before (index 1); a third of its 5 steps is 1.67, so
    # the pick is 1 + int(1.67) + int(0.83) = 2
    assert compare.valley(lrs, [5, 4, 6, 3, 2, 7, 1]) == 20.0
    assert compare.valley(lrs, [1, 2, 3, 4, 5, 6, 7]) == 0.0  # nothing falls: the first lr


def test_steepest_is_the_most_negative_gradient_after_the_skipped_points(compare):
    lrs = [float(k) for k in range(20)]
    losses = [10.0] * 20
    losses[0] = 100.0  # the steepest fall of all, but inside the 10 skipped points
    losses[14], losses[15] = 9.0, 5.0  # central differences: index 14 -> (5 - 10) / 2, 15 -> (10 - 9) / 2
    assert compare.steepest(lrs, losses) == 14.0
    assert compare.steepest(lrs, losses, skip_begin=0) == 0.0  # the one-sided first difference: 10 - 100


def test_min10_is_the_minimum_over_ten(compare):
    assert compare.min10([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(0.2)


def test_quick_comparison_runs_end_to_end_and_resumes(tmp_path):
    pytest.importorskip("prodigyplus")
    cmd = [sys.executable, "-m", MODULE, "--quick", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["meta"]["command"] and data["meta"]["versions"] and data["meta"]["quick"] is True
    rec = data["seeds"]["0"]
    probe, methods = rec["probe"], rec["methods"]
    assert set(methods) == {"find_lr", "law", "law_confirm", "valley", "steepest", "min10", "prodigy_sf"}
    ref = data["meta"]["reference"]
    # the law: A at the reference plain-LoRA rate / sqrt(4), no probe steps
    assert methods["law"]["lr"] == pytest.approx(ref["lr"] / 2) and methods["law"]["probe_steps"] == 0
    # the law confirmed over the quick ratios (1, 4): one of the law's rates, at most the 60-step budget
    lc = methods["law_confirm"]
    assert lc["ratio"] in (1, 4) and lc["lr"] == pytest.approx(ref["lr"] * lc["ratio"] ** -0.5)
    assert 0 < lc["probe_steps"] <= 60
    assert methods["find_lr"]["lr"] == probe["lr"] and methods["find_lr"]["probe_steps"] == probe["steps_used"] <= 60
    n_range = len(probe["range"]["4"])
    assert all(methods[m]["probe_steps"] == n_range and methods[m]["ratio"] == 4 for m in ("valley", "steepest", "min10"))
    assert methods["prodigy_sf"]["probe_steps"] == 0 and methods["prodigy_sf"]["lr"] == 1.0
    s = data["summary"]["find_lr"]
    assert s["rel_diff_mean"] == pytest.approx((methods["find_lr"]["test"] - ref["test"]["0"]) / ref["test"]["0"])
    assert data["summary"]["law_confirm"]["ratio_counts"] == {f"{lc['ratio']:g}": 1}  # one seed, its pick
    # resumable: a second call runs nothing new and keeps every record
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "demo.json").read_text())["seeds"]["0"]["methods"] == methods


def test_a_swept_run_is_found_for_plain_lora_and_for_lora_plus(compare, tmp_path):
    # ground truth: a fake sweep with one plain-LoRA run and one λ=4 run, written here
    def cell(method, lr, test):
        path = compare.V.cell_path(tmp_path, "order_B0", method)
        path.parent.mkdir(parents=True, exist_ok=True)
        run = {"seed": 0, "lr": lr, "test_loss": test, "val_loss": test, "diverged": False, "seconds": 1.0}
        path.write_text(json.dumps({"runs": [run]}))

    cell("lora", 0.004, 0.17)
    cell("loraplus4", 0.002, 0.16)
    task = compare.MiniLMTask("order_B0", sweeps=tmp_path)
    assert task.swept_run(0, 0.004, 1.0)["test"] == 0.17  # λ 1 is study v2's "lora" cell
    assert task.swept_run(0, 0.002, 4.0)["test"] == 0.16
    assert task.swept_run(0, 0.004, 4.0) is None and task.swept_run(1, 0.004, 1.0) is None
    assert task.swept_run(0, 0.004, 16.0) is None  # no such cell
