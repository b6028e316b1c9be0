"""What every demo task shares: its LoRA layer, the training loop through LoraPlus, and the progress bar."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

from .._groups._factory import LoraPlus
from .._progress import _progress, _TextBar  # noqa: F401  (re-exported for the demo and its tests)

__all__ = ["LoraLinear", "_progress", "_threads", "_train"]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a LoRA adapter, with PEFT's parameter names and init (B = 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        a, b = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
        self.lora_A = nn.ModuleDict({"default": a})
        self.lora_B = nn.ModuleDict({"default": b})
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.scaling = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


def _loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    m.eval()
    with torch.no_grad():
        val = nn.functional.cross_entropy(m(x), y).item()
    m.train()
    return val if math.isfinite(val) else float("inf")


def _train(
    m: nn.Module, task: Any, lr: float, ratio: float, seed: int, tick: Callable[[int], None],
    role_lr: dict[str, float] | None = None, optimizer_cls: Any = torch.optim.AdamW,
    options: dict[str, Any] | None = None, schedule_free: bool = False,
) -> tuple[list[float], float]:
    """AdamW (or ``optimizer_cls`` with ``options``) through LoraPlus on ``task``'s data (``x``,
    ``y``, ``x_val``, ``y_val``, ``x_test``, ``y_test``, ``cfg``); returns the test loss every
    ``cfg.eval_every`` steps and the final validation loss (``inf`` once it diverges). A
    ``schedule_free`` optimizer is switched to its ``eval()`` weights for every evaluation."""
    cfg = task.cfg
    m.train()
    opt = LoraPlus(optimizer_cls, m, ratio=ratio, lr=lr, weight_decay=0.0, role_lr=role_lr, **(options or {}))
    if schedule_free:
        opt.train()
    gen = torch.Generator().manual_seed(100 + seed)
    curve = []
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(task.x), (cfg.batch,), generator=gen)
        loss = nn.functional.cross_entropy(m(task.x[idx]), task.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick(1)
        if step % cfg.eval_every == 0:
            if schedule_free:
                opt.eval()
            curve.append(_loss(m, task.x_test, task.y_test))
            if schedule_free:
                opt.train()
    if schedule_free:
        opt.eval()
    return curve, _loss(m, task.x_val, task.y_val)
