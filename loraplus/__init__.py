"""loraplus: LoRA+ for any LoRA implementation and any PyTorch optimizer.

LoRA+ (Hayou, Ghosh, Yu, ICML 2024) trains a LoRA adapter's output-side factor B with a
learning rate ``ratio`` times larger than its input-side factor A.

    >>> import torch, loraplus
    >>> model = loraplus.testing.tiny_lora_model()
    >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=2e-4, weight_decay=0.01)
    >>> {g["role"]: g["lr"] for g in opt.param_groups}["B"]
    0.0032
"""

from __future__ import annotations

from . import testing
from ._errors import LoraPlusError
from ._find_lr import LrSuggestion, find_lr
from ._groups._apply import apply
from ._groups._build import DEFAULT_RATIO, param_groups, split_groups
from ._groups._checkpoint import load_state_dict
from ._groups._explain import explain
from ._groups._factory import LoraPlus
from ._groups._guard import guard
from ._groups._refine import refine
from ._groups._schedulers import per_group
from ._labels import classify
from ._layouts import CONVENTIONS, Convention
from ._monitor._lifecycle import Monitor
from ._pairs._pairs import Pair, Pairs, Unpaired, pairs
from ._pairs._params import pair_params
from ._pairs._precondition import Preconditioner, precondition, preconditioner
from ._role import Role

__all__ = [
    "CONVENTIONS",
    "Convention",
    "DEFAULT_RATIO",
    "LoraPlus",
    "LoraPlusError",
    "LrSuggestion",
    "Monitor",
    "Pair",
    "Pairs",
    "Preconditioner",
    "Unpaired",
    "Role",
    "apply",
    "classify",
    "explain",
    "find_lr",
    "guard",
    "load_state_dict",
    "pair_params",
    "pairs",
    "param_groups",
    "per_group",
    "precondition",
    "preconditioner",
    "refine",
    "split_groups",
    "testing",
]

__version__ = "0.1.0"

