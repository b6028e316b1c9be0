"""The default demo task: a pre-trained MLP adapted with LoRA to a teacher whose input features are rotated."""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
from torch import nn

from ._config import DemoConfig
from ._train import LoraLinear, _train

__all__ = ["_MlpTask"]


def _mlp(cfg: DemoConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(cfg.d_in, cfg.width), nn.GELU()]
    for _ in range(cfg.depth - 1):
        layers += [nn.Linear(cfg.width, cfg.width), nn.GELU()]
    layers.append(nn.Linear(cfg.width, cfg.classes))
    return nn.Sequential(*layers)


def _teacher_weights(cfg: DemoConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = 64
    w1 = torch.randn(hidden, cfg.d_in, generator=gen) * (2.0 / math.sqrt(cfg.d_in))
    w_new = torch.randn(hidden, cfg.d_in, generator=gen) * (2.0 / math.sqrt(cfg.d_in))
    w2 = torch.randn(cfg.classes, hidden, generator=gen) / math.sqrt(hidden)
    return w1, w_new, w2


def _label(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ w1.T) @ w2.T).argmax(-1)


class _MlpTask:
    """Pre-trained base + shifted data; ``run(lr, ratio, seed, tick)`` returns an eval-loss curve."""

    name = "mlp"

    def __init__(self, cfg: DemoConfig, tick: Callable[[int], None]) -> None:
        self.cfg = cfg
        gen = torch.Generator().manual_seed(1234)
        w1, w_new, w2 = _teacher_weights(cfg, gen)
        theta = math.radians(cfg.angle_deg)
        w1_shift = math.cos(theta) * w1 + math.sin(theta) * w_new  # rotated input features
        self.x_pre = torch.randn(8192, cfg.d_in, generator=gen)
        self.y_pre = _label(self.x_pre, w1, w2)
        self.x = torch.randn(8192, cfg.d_in, generator=gen)
        self.y = _label(self.x, w1_shift, w2)
        self.x_val = torch.randn(2048, cfg.d_in, generator=gen)  # picks the learning rate
        self.y_val = _label(self.x_val, w1_shift, w2)
        self.x_test = torch.randn(2048, cfg.d_in, generator=gen)  # reported
        self.y_test = _label(self.x_test, w1_shift, w2)
        torch.manual_seed(0)
        base = _mlp(cfg)
        opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
        bgen = torch.Generator().manual_seed(1)
        for _ in range(cfg.pretrain_steps):
            idx = torch.randint(0, len(self.x_pre), (cfg.batch,), generator=bgen)
            loss = nn.functional.cross_entropy(base(self.x_pre[idx]), self.y_pre[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(1)
        self.base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        with torch.no_grad():
            self.pretrain_acc = (base(self.x_pre[:2048]).argmax(-1) == self.y_pre[:2048]).float().mean().item()
            self.start_loss = nn.functional.cross_entropy(base(self.x_test), self.y_test).item()
        self.description = (
            f"MLP {cfg.d_in}->{cfg.width}x{cfg.depth}->{cfg.classes}, pre-trained {cfg.pretrain_steps} steps "
            f"(train acc {self.pretrain_acc:.0%}), then LoRA r={cfg.rank} on its {cfg.depth} hidden linears "
            f"(base and head frozen) adapted to a new teacher whose input features are rotated {cfg.angle_deg:g} deg "
            "away from the pre-training teacher's (same read-out), so the features must change; "
            f"{cfg.steps} AdamW steps, batch {cfg.batch}"
        )

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = _mlp(self.cfg)
        m.load_state_dict(self.base_state)
        for p in m.parameters():
            p.requires_grad_(False)
        for i in range(0, 2 * self.cfg.depth, 2):
            m[i] = LoraLinear(cast(nn.Linear, m[i]), self.cfg.rank)
        return m

    def run(self, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> tuple[list[float], float]:
        return _train(self.model(seed), self, lr, ratio, seed, tick)
