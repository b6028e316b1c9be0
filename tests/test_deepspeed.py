"""LoRA+ param groups through ``deepspeed.initialize`` (ZeRO stages 0, 1, 2) on CPU, 2 gloo ranks.

``deepspeed.initialize(model_parameters=loraplus.param_groups(...))`` with DeepSpeed's own
AdamW (``"torch_adam": true``) and its ``WarmupLR`` / ``WarmupDecayLR`` schedulers: each stage must keep one
optimizer group per LoRA+ group (same order, ``role``/``name`` keys intact), give B
``ratio`` × A's lr at every step of the schedule, and train exactly like a single-process
torch AdamW driven by the same schedule. One spawn (2 gloo ranks, tests/_ranks.py: a file store, a deadline) runs
all six cases; the scheduler traps are pinned in-process on a plain optimizer.
"""

from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
from _ranks import Rendezvous, join, leave, run_ranks  # noqa: E402
from torch import nn  # noqa: E402

import loraplus  # noqa: E402
from loraplus.testing import tiny_lora_model  # noqa: E402

WORLD = 2
STAGES = (0, 1, 2)
SCHEDULERS = ("WarmupLR", "WarmupDecayLR")
CASES = [(stage, kind) for stage in STAGES for kind in SCHEDULERS]
CASE_IDS = [f"zero{stage}-{kind}" for stage, kind in CASES]
STEPS = 4
LR = 1e-2
RATIO = 8.0
WEIGHT_DECAY = 0.01
MICRO_BATCH = 4
PG_TIMEOUT_S = 60
SPAWN_DEADLINE_S = 240


def _model() -> nn.Module:
    """The tiny PEFT-named model with B non-zero, so every factor moves from the first step."""
    model = tiny_lora_model(d=8, r=2, layers=2, n_out=2, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(WORLD * MICRO_BATCH, 8, generator=gen), torch.randn(WORLD * MICRO_BATCH, 2, generator=gen)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    return loraplus.param_groups(model, lr=LR, ratio=RATIO, weight_decay=WEIGHT_DECAY)


def _schedule_params(kind: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-group warmup floors and peaks (``loraplus.scheduler_bounds``): the way to keep the ratio."""
    params: dict[str, Any] = {
        "warmup_min_lr": loraplus.scheduler_bounds(groups, 0.1 * LR),
        "warmup_max_lr": loraplus.scheduler_bounds(groups, LR),
        "warmup_type": "linear",
    }
    if kind == "WarmupLR":
        return {**params, "warmup_num_steps": STEPS}
    return {**params, "warmup_num_steps": 2, "total_num_steps": STEPS + 1}


def _config(stage: int, kind: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
        "scheduler": {"type": kind, "params": _schedule_params(kind, groups)},
        "zero_optimization": {"stage": stage},
    }


def _lrs(opt: Any) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def _reference(kind: str) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """Single process, full batch, torch AdamW + DeepSpeed's scheduler class: the expected run."""
    from deepspeed.runtime import lr_schedules

    model = _model()
    groups = _groups(model)
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    sched = getattr(lr_schedules, kind)(opt, **_schedule_params(kind, groups))
    x, y = _data()
    lrs = []
    for _ in range(STEPS):
        lrs.append(_lrs(opt))
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    return lrs, {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- worker (runs in each rank)


def _run_case(stage: int, kind: str, rank: int) -> dict[str, Any]:
    import deepspeed

    model = _model()
    groups = _groups(model)
    engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=groups, config=_config(stage, kind, groups))
    x, y = _data()
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    info = [{k: v for k, v in g.items() if k in ("name", "role", "param_names")} for g in opt.param_groups]
    tensors = [len(g["params"]) for g in opt.param_groups]
    lrs = []
    for _ in range(STEPS):
        lrs.append(_lrs(opt))
        loss = nn.functional.mse_loss(engine(x[rows]), y[rows])
        engine.backward(loss)
        engine.step()  # also steps the scheduler
    return {
        "optimizer": type(opt).__name__,
        "base_optimizer": type(getattr(opt, "optimizer", opt)).__name__,
        "scheduler": type(sched).__name__,
        "groups": info,
        "tensors": tensors,
        "lrs": lrs,
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
    }


def _empty_group_case(stage: int) -> list[Any]:
    """PEFT-style groups with an empty one in front: what does the engine's optimizer keep?"""
    import deepspeed

    model = _model()
    empty = {"params": [], "param_names": [], "name": "embedding", "lr": 1e-6}
    config = _config(stage, "WarmupLR", _groups(model))
    del config["scheduler"]
    _, opt, _, _ = deepspeed.initialize(model=model, model_parameters=[empty, *_groups(model)], config=config)
    return [g.get("name") for g in opt.param_groups]


def _worker(rank: int, rendezvous: Rendezvous, outdir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update({"DS_ACCELERATOR": "cpu", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    os.environ.update({"WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD)})
    import logging

    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # An empty table of compatible ops skips DeepSpeed's compiler probe and its JIT build of the
    # shared-memory comm kernel (a C++ build: tens of seconds, needs a compiler); gloo carries
    # every collective instead, which is what this test is about.
    deepspeed.ops.__compatible_ops__ = {}
    join(rank, rendezvous)  # DeepSpeed then adopts the torch process group instead of creating its own
    ok = True
    try:
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=rendezvous.timeout)
        for stage, kind in CASES:
            try:
                result: dict[str, Any] = _run_case(stage, kind, rank)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(outdir) / f"zero{stage}.{kind}.rank{rank}.pt")
            if "error" in result:
                ok = False
                break
        else:
            try:
                kept: Any = {stage: _empty_group_case(stage) for stage in STAGES}
            except Exception:
                ok = False
                kept = {"error": traceback.format_exc()}
            torch.save(kept, Path(outdir) / f"empty.rank{rank}.pt")
    except BaseException:
        ok = False
        raise
    finally:
        leave(rank, rendezvous, ok=ok)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, list[Any]]:
    outdir = tmp_path_factory.mktemp("deepspeed")
    rendezvous = Rendezvous.fresh(outdir, world_size=WORLD, timeout_s=PG_TIMEOUT_S)
    run_ranks(_worker, (rendezvous, str(outdir)), world_size=WORLD, deadline_s=SPAWN_DEADLINE_S)
    out = {}
    for stage, kind in CASES:
        files = [outdir / f"zero{stage}.{kind}.rank{r}.pt" for r in range(WORLD)]
        out[(stage, kind)] = [torch.load(f, weights_only=False) if f.exists() else {"error": "no result"} for f in files]
    files = [outdir / f"empty.rank{r}.pt" for r in range(WORLD)]
    out["empty"] = [torch.load(f, weights_only=False) if f.exists() else {"error": "no result"} for f in files]
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[list[float]], dict[str, torch.Tensor]]]:
    return {kind: _reference(kind) for kind in SCHEDULERS}


def _ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
    return results


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=CASE_IDS)
def test_groups_survive_initialize(runs, stage, kind):
    expected = [{k: g[k] for k in ("name", "role", "param_names")} for g in _groups(_model())]
    for res in _ok(runs[(stage, kind)]):
        assert res["base_optimizer"] == "AdamW"
        assert res["scheduler"] == kind
        # one DeepSpeed group per LoRA+ group, same order, extra keys kept (ZeRO 1/2 replace each
        # group's params by one flat partition but keep the other keys)
        assert res["groups"] == expected
        if stage == 0:
            assert res["tensors"] == [len(g["param_names"]) for g in expected]
        else:
            assert res["optimizer"] == "DeepSpeedZeroOptimizer"
            # ZeRO 1/2 hold one flat fp32 partition per group: param_names no longer pair with params
            assert res["tensors"] == [1] * len(expected)


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=CASE_IDS)
def test_per_group_lrs_follow_the_schedule_with_the_ratio_kept(runs, reference, stage, kind):
    ref_lrs, _ = reference[kind]
    names = [g["role"] for g in _groups(_model())]
    for res in _ok(runs[(stage, kind)]):
        assert len(res["lrs"]) == len(ref_lrs)
        for got, want in zip(res["lrs"], ref_lrs):
            assert got == pytest.approx(want, rel=1e-12)
        for step in res["lrs"]:
            by_role = dict(zip(names, step))
            assert by_role["B"] == pytest.approx(RATIO * by_role["A"], rel=1e-12)
            assert by_role["A"] > 0
    assert len({tuple(s) for s in ref_lrs}) >= 3  # the schedule really changes the lrs


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=CASE_IDS)
def test_training_matches_single_process_torch_adamw(runs, reference, stage, kind):
    _, ref_params = reference[kind]
    before = dict(_model().named_parameters())
    results = _ok(runs[(stage, kind)])
    for rank, res in enumerate(results):
        for name, ref in ref_params.items():
            torch.testing.assert_close(res["params"][name], ref, rtol=1e-4, atol=1e-5, msg=f"stage {stage} rank {rank} {name}")
            if before[name].requires_grad:
                assert not torch.equal(ref, before[name].detach()), f"{name} did not move"
    for name in ref_params:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name


def test_trap_deepspeed_drops_empty_param_groups(runs):
    """PEFT's LoRA+ always emits four groups, some empty; DeepSpeed drops the empty ones, so a
    per-group list (scheduler bounds, logging) no longer lines up. loraplus never emits one."""
    lora_plus = [g["name"] for g in _groups(_model())]
    for kept in _ok(runs["empty"]):
        assert kept == {stage: lora_plus for stage in STAGES}  # "embedding" (empty) is gone
    assert all(g["params"] for g in _groups(_model()))


# --------------------------------------------------------------------------- scheduler traps (in-process)


def _plain_optimizer() -> torch.optim.Optimizer:
    return loraplus.LoraPlus(torch.optim.AdamW, _model(), RATIO, lr=LR, weight_decay=WEIGHT_DECAY)


def _ratio(opt: torch.optim.Optimizer) -> float:
    by_role = {g["role"]: g["lr"] for g in opt.param_groups}
    if by_role["A"] == 0:  # a warmup starting at 0: both must be 0
        assert by_role["B"] == 0, by_role
        return RATIO
    return by_role["B"] / by_role["A"]


def test_trap_scalar_warmup_max_lr_sets_every_group_to_the_same_lr():
    """DeepSpeed broadcasts a scalar ``warmup_max_lr`` to every group: LoRA+ is silently undone.
    If this starts failing, DeepSpeed changed and docs/compatibility.md needs updating."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR

    for cls, extra in ((WarmupLR, {}), (WarmupDecayLR, {"total_num_steps": 10})):
        opt = _plain_optimizer()
        sched = cls(opt, warmup_min_lr=0.0, warmup_max_lr=LR, warmup_num_steps=2, **extra)
        for _ in range(3):
            sched.step()
        assert _ratio(opt) == 1.0, cls.__name__


def test_per_group_lists_or_the_default_keep_the_ratio():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR

    opt = _plain_optimizer()
    peaks = loraplus.scheduler_bounds(opt, LR)
    assert peaks == [g["lr"] for g in opt.param_groups]
    sched = WarmupDecayLR(opt, total_num_steps=10, warmup_min_lr=0.0, warmup_max_lr=peaks, warmup_num_steps=2)
    for _ in range(6):
        sched.step()
        assert _ratio(opt) == pytest.approx(RATIO, rel=1e-12)
    # WarmupLR without warmup_max_lr reads the groups' own lrs as peaks
    opt = _plain_optimizer()
    sched = WarmupLR(opt, warmup_num_steps=3)
    for _ in range(4):
        sched.step()
        assert _ratio(opt) == pytest.approx(RATIO, rel=1e-12)
    # WarmupCosineLR scales each group's own lr
    opt = _plain_optimizer()
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=2)
    for _ in range(6):
        sched.step()
        assert _ratio(opt) == pytest.approx(RATIO, rel=1e-12)
