"""The vocabulary every stage shares: what a trainable parameter is to LoRA+."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from ._errors import LoraPlusError

__all__ = ["ADAPTER_ROLES", "Role", "group_role"]


class Role(str, Enum):
    """What a trainable parameter is to LoRA+.

    The value (a short string) is what optimizer param groups carry under ``"role"``.
    """

    #: Input-side (down) factor: ``x -> A x`` maps the layer input to the rank space.
    A = "A"
    #: Output-side (up) factor: maps the rank space to the layer output. LoRA+ gives it ``ratio * lr``.
    B = "B"
    #: A factor of an embedding adapter (its input is one-hot).
    EMBEDDING_A = "embedding_A"
    #: B factor of an embedding adapter.
    EMBEDDING_B = "embedding_B"
    #: Per-output-channel scale of weight-decomposed adapters (DoRA magnitude).
    MAGNITUDE = "magnitude"
    #: A middle factor that is neither input nor output side: AdaLoRA singular values,
    #: LoHa/LoKr Tucker cores, LoKr full Kronecker factors, KaSA's diagonal.
    CORE = "core"
    #: Trainable, but not an adapter factor: heads, ``modules_to_save`` copies, norms, biases.
    OTHER = "other"

    @classmethod
    def coerce(cls, value: Role | str) -> Role:
        """Turn ``Role.B``, ``"B"``, ``"b"`` or ``"embedding_a"`` into a :class:`Role`."""
        if isinstance(value, Role):
            return value
        if isinstance(value, str):
            key = value.strip()
            for role in cls:
                if key == role.value or key.lower() == role.value.lower() or key.upper() == role.name:
                    return role
        choices = ", ".join(repr(r.value) for r in cls)
        raise LoraPlusError(f"unknown role {value!r}; expected a loraplus.Role or one of {choices}")

    def __str__(self) -> str:
        return self.value

    @property
    def a_side(self) -> bool:
        """Input side of a product (A or embedding A)."""
        return self is Role.A or self is Role.EMBEDDING_A

    @property
    def b_side(self) -> bool:
        """Output side of a product (B or embedding B)."""
        return self is Role.B or self is Role.EMBEDDING_B


ADAPTER_ROLES = frozenset({Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B})


def group_role(group: Mapping[str, Any]) -> Role | None:
    """The :class:`Role` a param group's ``"role"`` key names (read as :meth:`Role.coerce` reads it).

    ``None`` when the group has no ``"role"`` or its value names no role (a framework's own key):
    compare the result with ``is Role.B``, never the group's string with a literal.
    """
    value = group.get("role")
    if value is None:
        return None
    try:
        return Role.coerce(value)
    except LoraPlusError:
        return None
