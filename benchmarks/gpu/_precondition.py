"""Part 3: Riemannian and LoRA-FA preconditioning on a device against a bare AdamW step and PEFT's
``create_riemannian_optimizer``, at Llama-8B's 224 pairs and widths 1,024–8,192 (``perf.precondition``'s
model and gradients, imported; each step timed after its gradients are restored, interleaved)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import loraplus
from benchmarks.perf import precondition as P

from ._context import Context

SETTINGS: dict[str, Any] = {"widths": [1024, 2048, 4096, 8192], "pairs": 224, "rank": 16, "repeat": 10, "warmup": 2,
            "optimizer": "torch.optim.AdamW(foreach=True)", "dtype": "float32", "reg": P.REG}
SMOKE: dict[str, Any] = {**SETTINGS, "widths": [16, 32], "pairs": 12, "rank": 4, "repeat": 3, "warmup": 1}
KINDS = ("bare", "riemannian", "lorafa", "peft_riemannian")


def _with_scaling(model: nn.Module) -> nn.Module:
    """perf.precondition's layers as PEFT holds them: a ``scaling`` per adapter (1: α = r), which
    LoRA-FA needs."""
    for layer in model.get_submodule("layers").children():
        setattr(layer, "scaling", {"default": 1.0})  # noqa: B010 (a plain attribute, not a submodule)
    return model


def _optimizers(models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
    from peft.optimizers import create_riemannian_optimizer

    kw: dict[str, Any] = {"lr": P.LR, "foreach": True}
    opts: dict[str, torch.optim.Optimizer] = {k: torch.optim.AdamW(models[k].parameters(), **kw) for k in ("bare", "riemannian", "lorafa")}
    loraplus.precondition(opts["riemannian"], models["riemannian"], method="riemannian", reg=P.REG)
    loraplus.precondition(opts["lorafa"], models["lorafa"], method="lorafa", reg=P.REG)
    peft_model: Any = models["peft_riemannian"]  # PEFT types it as a PeftModel; it reads names only
    opts["peft_riemannian"] = create_riemannian_optimizer(peft_model, torch.optim.AdamW, lr=P.LR, reg=P.REG,
                                                          foreach=True)
    return opts


def measure(ctx: Context, d: int, st: dict[str, Any]) -> dict[str, Any]:
    base = _with_scaling(P.build(st["pairs"], d, st["rank"], seed=0))
    saved = [g.to(ctx.device) for g in P._grads(base, seed=1)]
    models = {k: copy.deepcopy(base).to(ctx.device) for k in KINDS}
    opts = _optimizers(models)
    params = {k: list(m.parameters()) for k, m in models.items()}
    for ps in params.values():
        for p, g in zip(ps, saved):
            p.grad = g.clone() if p.requires_grad else None  # LoRA-FA froze A: autograd would leave it None

    def step(kind: str) -> Callable[[], None]:
        return opts[kind].step

    def one(kind: str) -> float:
        with torch.no_grad():
            for p, g in zip(params[kind], saved):
                if p.grad is not None:
                    p.grad.copy_(g)
        return ctx.seconds(step(kind))

    for _ in range(st["warmup"]):
        for kind in KINDS:
            one(kind)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(st["repeat"]):
        if i >= 1 and ctx.left() < 1.5 * sum(v[-1] for v in times.values()) + 1:  # one repetition at least
            break
        for kind in KINDS[i % len(KINDS):] + KINDS[: i % len(KINDS)]:
            times[kind].append(one(kind))
    med = {k: statistics.median(v) for k, v in times.items()}

    def over_bare(kind: str) -> dict[str, float]:
        v = [x / b for x, b in zip(times[kind], times["bare"])]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    return {"d": d, "pairs": st["pairs"], "repetitions": len(times["bare"]),
            "trainable_elements": sum(p.numel() for p in params["bare"]),
            "median_step_s": med, "over_bare": {k: over_bare(k) for k in KINDS if k != "bare"},
            "peft_added_over_riemannian_added": (med["peft_riemannian"] - med["bare"]) / (med["riemannian"] - med["bare"])
            if med["riemannian"] != med["bare"] else None,
            "times_s": times}


def run(ctx: Context) -> dict[str, Any]:
    st = SMOKE if ctx.smoke else SETTINGS
    import peft.optimizers  # noqa: F401  (imported once, before the first width's time is taken)

    runs: list[dict[str, Any]] = []
    stopped = False
    for d in st["widths"]:
        if runs and ctx.left() < 3 * runs[-1]["seconds"]:  # the next width costs more than the last
            stopped = True
            break
        t0 = time.monotonic()
        res = measure(ctx, d, st)
        res["seconds"] = time.monotonic() - t0
        runs.append(res)
        ob = res["over_bare"]
        ctx.log(f"precondition d={d}: bare {1e3 * res['median_step_s']['bare']:.2f} ms; riemannian "
                f"{ob['riemannian']['median']:.2f}x, lorafa {ob['lorafa']['median']:.2f}x, "
                f"peft {ob['peft_riemannian']['median']:.2f}x")
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": st, "results": {"runs": runs, "stopped_at_budget": stopped}}
