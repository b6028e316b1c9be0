"""The ground truth the checker and the tests compare loraplus against, written apart from its labeller:
the documented rate rule (``expected_lr``) and a generated model with what each of its parameters must
get (``GeneratedModel``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._role import Role

__all__ = ["GeneratedModel", "expected_lr"]


def expected_lr(
    role: Role,
    *,
    lr: float,
    ratio: float,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
) -> float:
    """The learning rate loraplus documents for a parameter of ``role`` (a reference, written apart).

    ``role_lr`` wins; B runs at ``ratio`` times A's rate (after ``role_lr[A]``); embedding factors
    at ``lr_embedding`` (default ``lr``); every other role at ``lr``.
    """
    over = {Role.coerce(k): float(v) for k, v in (role_lr or {}).items()}
    if role in over:
        return over[role]
    if role is Role.B:
        return ratio * over.get(Role.A, lr)
    if role in (Role.EMBEDDING_A, Role.EMBEDDING_B):
        return lr if lr_embedding is None else lr_embedding
    return lr


@dataclass
class GeneratedModel:
    """A generated model and what each of its trainable parameters must get.

    Attributes:
        model: the model.
        expected: ``{name: Role}`` for every trainable parameter.
        no_decay: names of the trainable parameters that must get no weight decay.
        rules: the ``rules=`` a caller must pass (raw factors under arbitrary names), or ``None``.
        pairs: ``(A name, B name)`` of every adapter that is one B·A product (LoRA-style layers;
            not LoHa, LoKr, VeRA, AdaLoRA), as built.
        conventions, wrapper: how it was built (shown when a property fails).
    """

    model: nn.Module
    expected: dict[str, Role]
    no_decay: frozenset[str] = frozenset()
    rules: dict[str, Role] | None = None
    conventions: list[str] = field(default_factory=list)
    wrapper: str = "none"
    pairs: frozenset[tuple[str, str]] = frozenset()

    def expected_lr(self, name: str, **rates: Any) -> float:
        """The learning rate ``name`` must get under ``lr=``, ``ratio=`` (and ``lr_embedding``, ``role_lr``)."""
        return expected_lr(self.expected[name], **rates)

    def expected_weight_decay(self, name: str, weight_decay: float | None) -> float | None:
        """0 for no-decay parameters, else ``weight_decay`` (None: the optimizer's default)."""
        return 0.0 if name in self.no_decay else weight_decay

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return (
            f"GeneratedModel(conventions={self.conventions}, wrapper={self.wrapper!r}, "
            f"expected={ {k: v.value for k, v in self.expected.items()} }, no_decay={sorted(self.no_decay)})"
        )
