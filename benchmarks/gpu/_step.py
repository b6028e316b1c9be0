"""Part 2: ``opt.step()`` on a Llama-shaped LoRA stack in bf16, LoRA+ groups against the same groups
written by hand (``perf.step``'s model and hand groups, imported), foreach and fused AdamW, LoraPlus
with and without its ratio guard, timed in interleaved repetitions (CUDA events on a GPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import loraplus
from benchmarks.perf import step as B

from ._context import Context

#: what one full-size layer's frozen bf16 base weights take: q, k, v, o (d×d) and up, down (d×4d)
BASE_BYTES_PER_PARAM = 2
SETTINGS: dict[str, Any] = {"d": 4096, "rank": 16, "gib": 4.0, "steps": 10, "repeat": 15, "dtype": "bfloat16"}
SMOKE: dict[str, Any] = {"d": 64, "rank": 4, "gib": 0.0002, "steps": 2, "repeat": 3, "dtype": "bfloat16"}


def layers_for(d: int, gib: float) -> int:
    """As many decoder layers as fit in ``gib`` GiB of frozen bf16 base weights (12·d² per layer)."""
    return max(1, int(gib * 2**30 // (12 * d * d * BASE_BYTES_PER_PARAM)))


def _factories(model: torch.nn.Module, kw: dict[str, Any]) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    common: dict[str, Any] = {"ratio": B.RATIO, "lr": B.LR, "weight_decay": B.WD, **kw}
    return {
        "loraplus": lambda: loraplus.LoraPlus(torch.optim.AdamW, model, **common),
        "loraplus_no_guard": lambda: loraplus.LoraPlus(torch.optim.AdamW, model, guard=None, **common),
        "hand": lambda: torch.optim.AdamW(B.hand_groups(model), lr=B.LR, **kw),
        "one_group": lambda: torch.optim.AdamW(trainable, lr=B.LR, weight_decay=B.WD, **kw),
    }


def _ratios(times: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    v = [x / y for x, y in zip(times[a], times[b])]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def run(ctx: Context) -> dict[str, Any]:
    st = dict(SMOKE if ctx.smoke else SETTINGS)
    st["layers"] = layers_for(st["d"], st["gib"])
    dtype = getattr(torch, st["dtype"])
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = B.build_model(st["layers"], st["d"], st["rank"]).to(dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p) * 1e-3
    st.update(trainable_tensors=len(trainable), trainable_elements=sum(p.numel() for p in trainable),
              ratio=B.RATIO, lr=B.LR, weight_decay=B.WD)
    ctx.log(f"step: {st['layers']} layers of width {st['d']}, {st['trainable_tensors']} trainable tensors")
    results: dict[str, Any] = {}
    stopped = False
    for n, impl in enumerate(("foreach", "fused")):
        share = time.monotonic() + ctx.left() / (2 - n)  # foreach gets half the time left, fused the rest
        opts = {k: f() for k, f in _factories(model, {impl: True}).items()}
        lp = {g["role"]: g["lr"] for g in opts["loraplus"].param_groups}
        hand = opts["hand"].param_groups
        if (lp["A"], lp["B"]) != (hand[0]["lr"], hand[1]["lr"]):
            raise AssertionError(f"LoraPlus groups {lp} differ from the hand-written ones")
        with torch.no_grad():
            for opt in opts.values():  # state initialised, kernels warmed up
                for _ in range(2):
                    opt.step()
            times: dict[str, list[float]] = {k: [] for k in opts}
            keys = list(opts)
            last = 0.0
            for rep in range(st["repeat"]):
                if rep >= 1 and time.monotonic() + 1.5 * last > share:  # one repetition at least
                    stopped = True
                    break
                t0 = time.monotonic()
                for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:  # who goes first rotates
                    opt = opts[key]

                    def steps(opt: torch.optim.Optimizer = opt) -> None:
                        for _ in range(st["steps"]):
                            opt.step()

                    times[key].append(ctx.seconds(steps) / st["steps"])
                last = time.monotonic() - t0
        med = {k: statistics.median(v) for k, v in times.items()}
        results[impl] = {
            "repetitions": len(times["loraplus"]), "step_seconds": times, "median_step_s": med,
            "per_repetition_ratios": {
                "loraplus_over_hand": _ratios(times, "loraplus", "hand"),
                "loraplus_over_loraplus_no_guard": _ratios(times, "loraplus", "loraplus_no_guard"),
                "loraplus_over_one_group": _ratios(times, "loraplus", "one_group"),
                "hand_over_one_group": _ratios(times, "hand", "one_group"),
            },
            "memory": {k: B.tensor_bytes(o) for k, o in opts.items()},
        }
        r = results[impl]["per_repetition_ratios"]
        ctx.log(f"step {impl}: loraplus {1e3 * med['loraplus']:.3f} ms, hand {1e3 * med['hand']:.3f} ms, "
                f"loraplus/hand {r['loraplus_over_hand']['median']:.3f}, "
                f"guard on/off {r['loraplus_over_loraplus_no_guard']['median']:.3f}")
        del opts
    return {"settings": st, "results": {**results, "stopped_at_budget": stopped}}
