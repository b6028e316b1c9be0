"""refine/apply recipes on 2 CPU gloo ranks (127.0.0.1): DeepSpeed ZeRO 2 and 3 with
``model_parameters=loraplus.apply_to_groups(...)`` and the optimizer given in the DeepSpeed config, and
FSDP2 (``fully_shard``) with ``loraplus.apply_to_optimizer`` on a torch AdamW. The code is the recipe of
docs/integrations.md ("Your own groups: recipes"). One spawn runs every case.
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

import loraplus  # noqa: E402
from loraplus.testing import tiny_lora_model  # noqa: E402

WORLD = 2
LR = 1e-2
RATIO = 8.0
STEPS = 3
DEADLINE_S = 300


def _model():
    model = tiny_lora_model(seed=0)
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return model


def _decay_split(model):
    """timm/HF style: matrices decay, vectors do not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.01, "name": "decay", "lr": LR},
        {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0, "name": "no_decay", "lr": LR},
    ]


def _ds_config(groups, stage):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": loraplus.scheduler_bounds(groups, 0.0, reference=LR),
            "warmup_max_lr": loraplus.scheduler_bounds(groups, LR, reference=LR),
            "warmup_num_steps": 1, "total_num_steps": STEPS + 1}},
        "zero_optimization": {"stage": stage},
    }  # fmt: skip


def _deepspeed_case(stage: int, rank: int) -> dict[str, Any]:
    import deepspeed

    model = _model()
    groups = loraplus.apply_to_groups(_decay_split(model), model, RATIO)
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=_ds_config(groups, stage))
    lrs = []
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))
    for _ in range(STEPS):
        lrs.append({g.get("name"): float(g["lr"]) for g in opt.param_groups})
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return {"names": [g.get("name") for g in opt.param_groups], "lrs": lrs, "optimizer": type(opt).__name__}


def _fsdp2_case(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(_decay_split(model), lr=LR)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=STEPS)
    loraplus.apply_to_optimizer(opt, model, RATIO, schedulers=[sched])
    lrs = []
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))
    for _ in range(STEPS):
        lrs.append({g["name"]: float(g["lr"]) for g in opt.param_groups})
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    dtensor = type(opt.param_groups[1]["params"][0]).__name__
    return {"names": [g["name"] for g in opt.param_groups], "lrs": lrs, "b_type": dtensor,
            "b_names": opt.param_groups[1]["param_names"]}  # fmt: skip


def _worker(rank: int, rendezvous: Rendezvous, outdir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update({"DS_ACCELERATOR": "cpu", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD)})  # fmt: skip
    import logging

    import deepspeed
    import deepspeed.ops

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.ops.__compatible_ops__ = {}  # no compiler probe / JIT build (see test_deepspeed.py)
    join(rank, rendezvous)  # DeepSpeed then adopts the torch process group instead of creating its own
    ok = True
    try:
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=rendezvous.timeout)
        out: dict[str, Any] = {}
        for key, run in (("fsdp2", lambda: _fsdp2_case(rank)), ("zero2", lambda: _deepspeed_case(2, rank)),
                         ("zero3", lambda: _deepspeed_case(3, rank))):  # fmt: skip
            try:
                out[key] = run()
            except Exception as err:
                ok = False
                out[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        ok = False
        raise
    finally:
        leave(rank, rendezvous, ok=ok)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")

    outdir = tmp_path_factory.mktemp("apply_dist")
    rendezvous = Rendezvous.fresh(outdir, world_size=WORLD, timeout_s=60)
    run_ranks(_worker, (rendezvous, str(outdir)), world_size=WORLD, deadline_s=DEADLINE_S)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ratio_kept(lrs, parent, child):
    assert len(lrs) == STEPS
    for step in lrs:
        assert step[child] == pytest.approx(RATIO * step[parent], rel=1e-12), step
    assert any(step[parent] > 0 for step in lrs)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_keeps_the_refined_groups_and_the_ratio(runs, stage):
    for res in runs:
        out = res[f"zero{stage}"]
        assert "error" not in out, out.get("traceback")
        assert out["names"] == ["decay", "decay.B", "no_decay"]
        _ratio_kept(out["lrs"], "decay", "decay.B")


def test_fsdp2_apply_after_fully_shard_keeps_the_ratio(runs):
    for res in runs:
        out = res["fsdp2"]
        assert "error" not in out, out.get("traceback")
        assert out["names"] == ["decay", "decay.B", "no_decay"]
        assert out["b_type"] == "DTensor"
        assert out["b_names"] == ["layers.0.lora_B.default.weight", "layers.1.lora_B.default.weight"]
        _ratio_kept(out["lrs"], "decay", "decay.B")
