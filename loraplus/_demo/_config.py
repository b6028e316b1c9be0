"""The demo's sizes: one :class:`DemoConfig` per preset and model."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MINILM_HEAD_LR", "MINILM_PRESETS", "MLP_PRESETS", "DemoConfig"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (``quick`` and ``full`` presets below)."""

    steps: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    eval_every: int
    batch: int = 256
    pretrain_steps: int = 1500
    width: int = 256
    depth: int = 3
    d_in: int = 32
    classes: int = 10
    rank: int = 8
    angle_deg: float = 90.0


MLP_PRESETS = {
    "quick": DemoConfig(steps=150, lrs=(1e-3, 3e-3), seeds=(0,), eval_every=10, pretrain_steps=400),
    "full": DemoConfig(steps=400, lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), eval_every=10),
}


MINILM_PRESETS = {
    "quick": DemoConfig(steps=16, lrs=(1e-3, 3e-3), seeds=(0,), eval_every=8, batch=16, rank=8),
    "full": DemoConfig(steps=60, lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), seeds=(0,), eval_every=10, batch=32, rank=8),
}


#: Learning rate of the MiniLM demo's classification head (role ``other``), fixed across the sweep.
MINILM_HEAD_LR = 1e-3
