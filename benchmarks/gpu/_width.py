"""Part 5: study v2's width family at widths 512, 1,024 and 2,048 on a device, pretraining included, with
the study's protocol cut to what fits, then the best λ per width and the slope of log λ* on log width
over these and the committed CPU widths (benchmarks/studies/v2/results/), with its 95 % interval.

Reused by import, not copied: the task, the model, pretraining and one fine-tuning run
(``common.widthfamily``), each λ's settings and the lr start grid (``studies.v2.run.settings``), the lattice and the
grid's extension until the best rate is interior (``common.stats``), and the per-width summary and the fit
(``common.report.task_summary`` / ``width_summary``). This module only orders the runs, keeps them inside
the part's budget (a run is started only while the time left covers it, estimated from the last run
at that width, or from the previous width × its cost ratio) and gathers them.

What is cut from the study's protocol, and said in the JSON: λ on a ×4 grid (1, 4, 16, 64, extended
×4 while the best λ is the largest) instead of ×2 (1 … 64); everything else is the study's (2 seeds,
200 steps, batch 16, 1,200 pretraining steps, the ×2 lr grid grown until its best is interior, fp32).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict
from typing import Any

from benchmarks.common import report as R
from benchmarks.common import stats as S
from benchmarks.common import widthfamily as W
from benchmarks.studies.v2 import run as V

from ._context import Context

#: the study's protocol at the GPU widths, λ cut to a ×4 grid
SETTINGS: dict[str, Any] = {"widths": [512, 1024, 2048], "ratios": [1, 4, 16, 64], "ratio_step": 4, "max_ratio": 256,
                            "seeds": 2, "steps": 200, "pretrain_steps": W.PRETRAIN["steps"], "n_eval": 256,
                            "max_rounds": 6, "one_lr": False}
#: toy sizes for --smoke: one lr per λ (the grid's middle start point), a few steps
SMOKE: dict[str, Any] = {"widths": [8, 16], "ratios": [1, 4], "ratio_step": 4, "max_ratio": 4, "seeds": 2,
                         "steps": 6, "pretrain_steps": 4, "n_eval": 16, "max_rounds": 1, "one_lr": True}
#: a width costs about (width ratio)² more per step than the last (matrix products dominate)
COST_EXPONENT = 2.0


def method_of(ratio: float) -> str:
    return "lora" if ratio == 1 else f"loraplus{int(ratio)}"


def cell_settings(width: int, ratio: float, cfg: dict[str, Any]) -> V.Settings:
    """``studies.v2.run.settings`` of this λ (its start grid), at this width and the kit's sizes."""
    st = V.settings(V.WIDTH_TASKS[0], method_of(ratio))
    st = dataclasses.replace(st, width=width, seeds=cfg["seeds"], steps=cfg["steps"],
                             pretrain_steps=cfg["pretrain_steps"], n_eval=cfg["n_eval"])
    if cfg["one_lr"]:
        k = st.start[len(st.start) // 2]
        st = dataclasses.replace(st, start=(k,), k_min=k, k_max=k)
    return st


def probe(ctx: Context, width: int, steps: int = 5, batch: int = 16) -> dict[str, float]:
    """Seconds per pretraining step (every weight, AdamW) and per fine-tuning step (LoRA r = 8 on
    ``common.widthfamily.TARGETS``, LoraPlus AdamW) of the width family's model at ``width`` on the context's
    device, random weights (the cost does not depend on them), after two warm-up steps."""
    import peft
    import torch

    import loraplus

    torch.manual_seed(0)
    x = torch.randint(0, W.VOCAB, (batch, W.CTX + 1)).to(ctx.device)

    def per_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        def one() -> None:
            loss = W.lm_loss(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):
            one()

        def many() -> None:
            for _ in range(steps):
                one()

        return ctx.seconds(many) / steps

    full = W.GPT(width).to(ctx.device)
    pre = per_step(full, torch.optim.AdamW(full.parameters(), lr=1e-4))
    base = W.GPT(width).requires_grad_(False)
    cfg = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=W.TARGETS)
    lora = peft.inject_adapter_in_model(cfg, base).to(ctx.device)
    fine = per_step(lora, loraplus.LoraPlus(torch.optim.AdamW, lora, ratio=4, lr=1e-4))
    return {"pretrain_step_s": pre, "finetune_step_s": fine}


def estimate(costs: dict[str, float], cfg: dict[str, Any]) -> float:
    """Seconds for one width at the least the protocol needs: pretraining, and each λ's start grid
    (3 rates) × seeds fine-tuning runs (evaluation and set-up counted as 10 % more)."""
    runs = len(cfg["ratios"]) * (1 if cfg["one_lr"] else 3) * cfg["seeds"]
    return 1.1 * (cfg["pretrain_steps"] * costs["pretrain_step_s"] + runs * cfg["steps"] * costs["finetune_step_s"])


class OutOfTime(Exception):
    """The part's budget does not cover the next run."""


class Runner:
    """Runs fine-tuning jobs on the context's device while the budget lasts; remembers their cost."""

    def __init__(self, ctx: Context, cfg: dict[str, Any]) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.run_seconds: dict[int, float] = {}  # width → seconds of its latest run
        self.pretrain_seconds: dict[int, float] = {}

    def _estimate(self, width: int, table: dict[int, float]) -> float:
        if width in table:
            return table[width]
        smaller = [w for w in table if w < width]
        if not smaller:
            return 0.0
        w = max(smaller)
        return table[w] * (width / w) ** COST_EXPONENT

    def _check(self, need: float, what: str) -> None:
        if self.ctx.left() < 1.2 * need + 1.0:
            raise OutOfTime(f"{what}: {self.ctx.left():.0f} s left, about {need:.0f} s needed")

    def pretrain(self, width: int) -> dict[str, Any]:
        self._check(self._estimate(width, self.pretrain_seconds), f"pretraining width {width}")
        t0 = time.monotonic()
        meta = W._base(width, self.cfg["pretrain_steps"], str(self.ctx.device))["meta"]
        self.pretrain_seconds[width] = time.monotonic() - t0
        self.ctx.log(f"width {width}: pretrained in {self.pretrain_seconds[width]:.1f} s, "
                     f"prose loss before fine-tuning {meta['prose_test_loss_before_finetune']:.3f}")
        return dict(meta)

    def finetune(self, st: V.Settings, ratio: float, k: int, seed: int) -> dict[str, Any]:
        self._check(self._estimate(st.width, self.run_seconds), f"width {st.width} λ={ratio:g}")
        cfg = W.FinetuneConfig(width=st.width, ratio=float(ratio), lr=S.lr_of(k), seed=seed, steps=st.steps,
                               batch=st.batch, pretrain_steps=st.pretrain_steps, n_eval=st.n_eval,
                               device=str(self.ctx.device))
        t0 = time.monotonic()
        r = W.finetune(cfg)
        self.run_seconds[st.width] = time.monotonic() - t0
        r.pop("config")
        r["curve"] = [round(v, 4) if math.isfinite(v) else v for v in r["curve"]]
        return r


def run_cell(runner: Runner, width: int, ratio: float) -> dict[str, Any]:
    """One (width, λ) cell in study v2's file format: the lr grid grown until its best is interior."""
    st = cell_settings(width, ratio, runner.cfg)
    cell: dict[str, Any] = {"meta": {"task": f"width{width}", "method": method_of(ratio), "settings": asdict(st),
                                     "complete": False}, "runs": []}
    seeds = list(range(st.seeds))
    for _ in range(runner.cfg["max_rounds"]):
        done = sorted({S.k_of(r["lr"]) for r in cell["runs"]})
        val = {S.k_of(lr): v for lr, v in S.select(cell["runs"], seeds).val.items()} if done else {}
        todo = S.next_ks(done, val, st.start, st.refine, st.k_min, st.k_max)
        if not todo:
            cell["meta"]["complete"] = True
            break
        for k in todo:
            for seed in seeds:
                r = runner.finetune(st, ratio, k, seed)
                cell["runs"].append(r)
                runner.ctx.log(f"width {width} λ={ratio:g} lr={r['lr']:g} seed={seed} val={r['val_loss']:.4f} "
                               f"{r['seconds']:.1f} s")
    else:
        done = sorted({S.k_of(r["lr"]) for r in cell["runs"]})
        val = {S.k_of(lr): v for lr, v in S.select(cell["runs"], seeds).val.items()}
        cell["meta"]["complete"] = not S.next_ks(done, val, st.start, st.refine, st.k_min, st.k_max)
    return cell


def _best_ratio(cells: dict[str, dict[str, Any]]) -> float:
    vals = {}
    for m, c in cells.items():
        sel = S.select(c["runs"], range(c["meta"]["settings"]["seeds"]))
        vals[V.ratio_of(m)] = sel.val[sel.best_lr]
    return min(vals, key=lambda lam: (vals[lam], lam))


def run_width(runner: Runner, width: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every λ of one width (extended ×ratio_step while the best λ is the largest); its cells and status."""
    cfg = runner.cfg
    meta = runner.pretrain(width)
    cells: dict[str, dict[str, Any]] = {}
    ratios = list(cfg["ratios"])
    while True:
        for lam in ratios:
            if method_of(lam) not in cells:
                cells[method_of(lam)] = run_cell(runner, width, lam)
        best = _best_ratio(cells)
        if best == max(ratios) and best * cfg["ratio_step"] <= cfg["max_ratio"]:
            ratios.append(best * cfg["ratio_step"])
            continue
        break
    complete = all(c["meta"]["complete"] for c in cells.values())
    return cells, {"pretrain": meta, "ratios": ratios, "complete": complete}


def summarise(gpu_cells: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Study v2's per-width summary and fit over the committed CPU widths and the widths run here."""
    cpu = {t: c for t, c in R.load_all(V.OUT).items() if t in V.WIDTH_TASKS and t not in gpu_cells}
    tasks = {**cpu, **gpu_cells}
    names = sorted(tasks, key=lambda t: int(t[len("width"):]))
    summaries = {t: R.task_summary(t, tasks[t], V.DESIGN) for t in names}
    out = R.width_summary(summaries, V.DESIGN, names)
    for t in names:
        out["per_width"][t[len("width"):]]["source"] = "this run" if t in gpu_cells else "benchmarks/studies/v2/results"
    # the widths run here alone (their corpora come from this Python, see same_data)
    mine = [t for t in names if t in gpu_cells]
    alone = R.width_summary({t: summaries[t] for t in mine}, V.DESIGN, mine)
    out["this_run_only"] = {k: alone[k] for k in ("fit_interp", "fit_grid", "widths_left_out") if k in alone}
    return out


def same_data(pretrain_steps: int) -> dict[str, Any]:
    """Whether this Python's corpora are the CPU widths' (both come from the running Python's standard
    library: another Python version has other source files and other reference-manual prose)."""
    cpu_cells = R.load_all(V.OUT).get(V.WIDTH_TASKS[0], {})
    cpu = next(iter(cpu_cells.values()))["meta"].get("data", {}) if cpu_cells else {}
    here = {"python": platform.python_version(), "prose_sha256": W.prose().sha256,
            "pretrain_corpus_bytes": len(W.pretrain_corpus())}
    there = {"python": next(iter(cpu_cells.values()))["meta"]["versions"]["python"] if cpu_cells else None,
             "prose_sha256": cpu.get("prose_sha256"),
             "pretrain_corpus_bytes": cpu.get("pretrain", {}).get("corpus_bytes")}
    return {"here": here, "cpu_widths": there,
            "same_prose": here["prose_sha256"] == there["prose_sha256"],
            "same_pretrain_corpus_size": here["pretrain_corpus_bytes"] == there["pretrain_corpus_bytes"]}


def run(ctx: Context) -> dict[str, Any]:
    cfg = SMOKE if ctx.smoke else SETTINGS
    runner = Runner(ctx, cfg)
    widths: dict[str, Any] = {}
    gpu_cells: dict[str, dict[str, dict[str, Any]]] = {}
    stopped = None
    probes: dict[str, Any] = {}
    old = os.environ.get("LORAPLUS_CACHE")
    with tempfile.TemporaryDirectory() as cache:  # pretrained models stay out of the repository and $OUT
        os.environ["LORAPLUS_CACHE"] = cache
        try:
            for width in cfg["widths"]:
                costs = probe(ctx, width)
                need = estimate(costs, cfg)
                probes[str(width)] = {**costs, "least_seconds_estimate": need}
                ctx.log(f"width {width}: {1e3 * costs['pretrain_step_s']:.1f} ms per pretraining step, "
                        f"{1e3 * costs['finetune_step_s']:.1f} ms per fine-tuning step; at least {need:.0f} s")
                if need > ctx.left():
                    stopped = f"width {width} needs at least {need:.0f} s, {ctx.left():.0f} s left: not started"
                    ctx.log(f"width: {stopped}")
                    widths[str(width)] = {"complete": False, "stopped": stopped}
                    break
                try:
                    cells, status = run_width(runner, width)
                except OutOfTime as err:
                    stopped = str(err)
                    ctx.log(f"width: stopped at the budget ({err})")
                    widths[str(width)] = {"complete": False, "stopped": stopped}
                    break
                widths[str(width)] = {**status, "cells": cells}
                if status["complete"]:
                    gpu_cells[f"width{width}"] = cells
        finally:
            W._base.cache_clear()
            if old is None:
                os.environ.pop("LORAPLUS_CACHE", None)
            else:
                os.environ["LORAPLUS_CACHE"] = old
    summary = summarise(gpu_cells)
    summary["data"] = same_data(cfg["pretrain_steps"])
    fit = summary.get("fit_interp")
    if fit:
        ctx.log(f"width: slope of log λ* on log width {fit['slope']:.2f} [{fit['ci95'][0]:.2f}, {fit['ci95'][1]:.2f}] "
                f"over widths {fit['widths']}")
    return {"settings": {**cfg, "protocol_cut": "λ on a ×4 grid (1, 4, 16, 64, extended ×4 while the best λ is "
                                                "the largest) instead of study v2's ×2 grid; the rest as in the study",
                         "device": str(ctx.device), "tf32": False,
                         "run_seconds_by_width": runner.run_seconds, "pretrain_seconds_by_width": runner.pretrain_seconds},
            "results": {"stopped_at_budget": stopped, "cost_probe": probes, "widths": widths, "summary": summary}}
