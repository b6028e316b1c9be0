"""The ratio guard through the wrappers that step a LoRA+ optimizer: DDP, FSDP2, FSDP1 (world size 1,
gloo on a file store), accelerate's ``AcceleratedOptimizer`` and DeepSpeed's engine at ZeRO stages 0, 1
and 2 (stages 1 and 2 step the optimizer one group at a time).

For each wrapper, a schedule that keeps the ratio (per-group bounds) must train ``STEPS`` steps with
no alarm while the rates move, and one that breaks it (every group at one rate) must be refused before
the step after it (``guard="raise"``). Everything runs in one subprocess (this file run as a script),
so the test process never initialises torch.distributed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

STEPS = 5
RATIO, LR = 8.0, 1e-2
WRAPPERS = ("ddp", "fsdp2", "fsdp1", "accelerate", "zero0", "zero1", "zero2")


def _case(kind: str, broken: bool) -> dict[str, Any]:
    import torch

    import loraplus

    torch.manual_seed(0)
    model = loraplus.testing.tiny_lora_model(d=8, r=2, layers=2, n_out=2, seed=0)
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    step: Callable[[], None]
    if kind.startswith("zero"):
        import deepspeed
        from deepspeed.runtime.lr_schedules import WarmupDecayLR

        opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard="raise")
        peak: Any = LR if broken else loraplus.scheduler_bounds(opt, LR)  # DeepSpeed broadcasts a scalar peak
        sched = WarmupDecayLR(opt, total_num_steps=10, warmup_min_lr=0.0, warmup_max_lr=peak, warmup_num_steps=2)
        config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": int(kind[-1])},
                  "zero_allow_untested_optimizer": True}
        engine, wrapped_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)

        def step() -> None:
            engine.backward(((engine(x) - y) ** 2).mean())
            engine.step()  # steps the optimizer, then the scheduler

        groups = wrapped_opt.param_groups
    else:
        wrapped = model
        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        elif kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        elif kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        opt = loraplus.LoraPlus(torch.optim.AdamW, wrapped, RATIO, lr=LR, guard="raise")
        sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, STEPS)
        stepper: Any = opt
        if kind == "accelerate":
            from accelerate import Accelerator

            stepper = Accelerator(cpu=True).prepare(opt)

        def step() -> None:
            ((wrapped(x) - y) ** 2).mean().backward()
            stepper.step()
            stepper.zero_grad()
            sched.step()
            if broken:
                for g in opt.param_groups:  # a hand-written rate written into every group
                    g["lr"] = LR

        groups = opt.param_groups
    rates: list[dict[str, float]] = []
    try:
        for _ in range(STEPS):
            step()
            rates.append({str(g["name"]): float(g["lr"]) for g in groups})
    except loraplus.LoraPlusError as err:
        return {"refused": str(err), "rates": rates, "violations": loraplus.groups.guard(opt).violations}
    return {"refused": None, "rates": rates, "violations": loraplus.groups.guard(opt).violations}


def main(out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):  # deepspeed reads them
        os.environ.setdefault(key, value)
    import torch.distributed as dist

    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    results: dict[str, Any] = {}
    try:
        for kind in WRAPPERS:
            for broken in (False, True):
                key = f"{kind}-{'broken' if broken else 'kept'}"
                try:
                    results[key] = _case(kind, broken)
                except Exception:  # reported to the test, which names the case
                    results[key] = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(results))
    # DeepSpeed's engines and FSDP keep gloo objects alive until interpreter exit, where tearing down
    # gloo's threads can abort the process ("terminate called without an active exception", exit -6,
    # seen once in CI) after every result was written: free them now and leave without that teardown
    import gc

    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("guard") / "results.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", WRAPPERS)
def test_a_schedule_that_keeps_the_ratio_raises_no_alarm(results, kind):
    res = results[f"{kind}-kept"]
    assert "error" not in res, res.get("error")
    assert res["refused"] is None and res["violations"] == 0
    assert len(res["rates"]) == STEPS
    for rates in res["rates"]:
        assert rates["B"] == pytest.approx(RATIO * rates["A"], rel=1e-9)
        assert rates["other"] == pytest.approx(rates["A"], rel=1e-9)
    assert len({r["A"] for r in res["rates"]}) >= 3, "the schedule never moved the rates: nothing was checked"


@pytest.mark.parametrize("kind", WRAPPERS)
def test_one_rate_for_every_group_is_refused_before_the_next_step(results, kind):
    res = results[f"{kind}-broken"]
    assert "error" not in res, res.get("error")
    assert res["refused"] is not None, res["rates"]
    assert "group 'B' (B parameters)" in res["refused"]
    last = res["rates"][-1]  # the rates the refused step would have used
    assert last["B"] == last["A"]


if __name__ == "__main__":
    main(sys.argv[1])
