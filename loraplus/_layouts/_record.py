"""What a LoRA implementation is to loraplus: one :class:`Layout` record holds all of it.

A record says which trailing name segments are its factors and what role each plays, which
partner attribute a factor needs next to it, whether its names are generic (and so need a
bias-free rank bottleneck), how its factors are oriented, whether A and B form one B·A product,
how to read the layer's LoRA scaling, and which module types it is detected by. Labelling,
pairing, the warnings and the Monitor read these fields; nothing branches on the record's
display name.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from .._role import Role

__all__ = ["Detector", "Factor", "Family", "HolderCheck", "Layout", "Orientation", "ScalingReader", "number", "ratio"]


class Family(str, Enum):
    """The adapter family: how the factors make the weight update."""

    LORA = "lora"
    DORA = "dora"
    ADALORA = "adalora"
    LOHA = "loha"
    LOKR = "lokr"
    VERA = "vera"
    KASA = "kasa"


class Orientation(str, Enum):
    """How the factors are stored.

    ``STANDARD``: A is (r, in…) and B is (out, r…), ΔW = B·A. ``TRANSPOSED``: stored as A (in, r) and
    B (r, out), applied as x·A·B, so ΔW = (A·B)ᵀ (DeepSpeed-Chat, minLoRA embeddings).
    """

    STANDARD = "standard"
    TRANSPOSED = "transposed"


@dataclass(frozen=True)
class Factor:
    """One kind of tensor of a layout, named by the trailing segments of its parameter name.

    Attributes:
        pattern: the trailing segments; ``pattern[0]`` is the attribute of the module that holds the
            factor (the *holder*), ``"*"`` stands for exactly one segment, the adapter name.
        role: the role the tensor gets.
        partner: an attribute the holder must also have (A's B, B's A); ``None``: no such rule.
        bias: the adapted layer's own bias (PEFT ``lora_bias``): at its role's rate, never paired.
    """

    pattern: tuple[str, ...]
    role: Role
    partner: str | None = None
    bias: bool = False

    @property
    def segment(self) -> str:
        """The holder's attribute that holds this factor (``lora_A``, ``lora_down``, …)."""
        return self.pattern[0]

    #: Index of the adapter-name wildcard in ``pattern`` (None: the layout has no adapter names); derived.
    adapter_at: int | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_at", self.pattern.index("*") if "*" in self.pattern else None)


@dataclass(frozen=True)
class Detector:
    """Module types that identify a layout, given as ``(module path, class name)``.

    The classes are read from ``sys.modules`` only: a library that was never imported cannot have
    built the model's layers, so nothing is imported to find out.
    """

    classes: tuple[tuple[str, str], ...]

    def types(self) -> tuple[type, ...]:
        out = []
        for module, cls in self.classes:
            found = getattr(sys.modules.get(module), cls, None)
            if isinstance(found, type):
                out.append(found)
        return tuple(out)


ScalingReader = Callable[[nn.Module, str], "float | None"]
HolderCheck = Callable[[nn.Module, str], bool]


def _no_scaling(holder: nn.Module, adapter: str) -> float | None:
    return None


@dataclass(frozen=True, eq=False)
class Layout:
    """Everything loraplus knows about one LoRA implementation.

    Attributes:
        name: shown in tables, pairs and messages (never branched on).
        library: the project it comes from (``PEFT``, ``torchtune``, …), for messages.
        family: the adapter family.
        factors: the tensors it names, most specific first.
        product: whether its A and B form one ΔW = s·B·A product (LoHa, LoKr, VeRA, AdaLoRA, KaSA do not).
        orientation: how A and B are stored.
        embedding_orientation: the orientation on an ``nn.Embedding`` host where it differs (minLoRA).
        generic: its factor names are ones a model without LoRA may use (``down``/``up``): A and B count
            only when both are bias-free and map in → r → out with r below both.
        scaling: reads the layer's LoRA scaling s from the holder and the adapter name (None: unknown).
        detect: module types that carry this layout (matched before any name).
        requires: a structural check on the holder that must hold (a DoRA layer has its magnitude).
        within: a segment the name must contain before the holder; the adapted layer sits before it
            (minLoRA's ``parametrizations``).
        not_a_product: why A and B are not one product, for ``product=False`` layouts.
    """

    name: str
    library: str
    family: Family
    factors: tuple[Factor, ...]
    product: bool = True
    orientation: Orientation = Orientation.STANDARD
    embedding_orientation: Orientation | None = None
    generic: bool = False
    scaling: ScalingReader = _no_scaling
    detect: Detector | None = None
    requires: HolderCheck | None = None
    within: str | None = None
    not_a_product: str = ""

    def orientation_on(self, embedding: bool) -> Orientation:
        """The factors' orientation on this host."""
        if embedding and self.embedding_orientation is not None:
            return self.embedding_orientation
        return self.orientation

    def display(self, embedding: bool) -> str:
        """The name shown for a pair of this layout on an embedding or another layer."""
        return f"{self.name} embedding" if embedding and self.embedding_orientation is not None else self.name

    def accepts(self, holder: nn.Module | None, adapter: str) -> bool:
        """Whether the holder passes this layout's structural check."""
        return self.requires is None or (holder is not None and self.requires(holder, adapter))

    def __repr__(self) -> str:
        return f"Layout({self.name!r})"


# ----------------------------------------------------------------------------------------------- readers' helpers


def number(value: object) -> float | None:
    """A finite real number read from a layer attribute (a one-element tensor too), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def ratio(num: object, den: object) -> float | None:
    """``num / den`` for attributes that hold numbers, else None."""
    n, d = number(num), number(den)
    return None if n is None or not d else n / d
