"""loraplus: LoRA+ for any LoRA implementation and any PyTorch optimizer.

LoRA+ (Hayou, Ghosh, Yu, ICML 2024) trains a LoRA adapter's output-side factor B with a
learning rate ``ratio`` times larger than its input-side factor A.

    >>> import torch, loraplus
    >>> model = loraplus.testing.tiny_lora_model()
    >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=2e-4, weight_decay=0.01)
    >>> {g["role"]: g["lr"] for g in opt.param_groups}["B"]
    0.0032

The records that calls hand back, and the lower-level tools, live in submodules:
:mod:`loraplus.pairing` (pairs and preconditioners), :mod:`loraplus.groups` (splitting groups,
the ratio guard), :mod:`loraplus.layouts` (the LoRA layouts recognised), :mod:`loraplus.probe`
(what :func:`find_lr` returns), :mod:`loraplus.schedulers` and :mod:`loraplus.testing`.
"""

from __future__ import annotations

from typing import Any

# the public submodules, reachable as loraplus.<name> after `import loraplus`
from . import groups as groups
from . import layouts as layouts
from . import pairing as pairing
from . import probe as probe
from . import schedulers as schedulers
from . import testing as testing
from ._deprecated import resolve as _resolve
from ._errors import LoraPlusError
from ._find_lr import find_lr
from ._groups._apply import apply_to_optimizer
from ._groups._build import DEFAULT_RATIO, param_groups
from ._groups._checkpoint import load_optimizer_state
from ._groups._explain import explain
from ._groups._factory import LoraPlus
from ._groups._refine import apply_to_groups
from ._groups._schedulers import scheduler_bounds
from ._labels import classify
from ._monitor._lifecycle import Monitor
from ._pairs._pairs import pairs
from ._pairs._precondition import precondition
from ._role import Role

__all__ = [
    "DEFAULT_RATIO",
    "LoraPlus",
    "LoraPlusError",
    "Monitor",
    "Role",
    "apply_to_groups",
    "apply_to_optimizer",
    "classify",
    "explain",
    "find_lr",
    "load_optimizer_state",
    "pairs",
    "param_groups",
    "precondition",
    "scheduler_bounds",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The names of loraplus 0.1 that moved or were renamed: still there, with a FutureWarning once each."""
    return _resolve(name)
