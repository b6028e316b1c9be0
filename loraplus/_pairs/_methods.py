"""The preconditioning methods :func:`loraplus.precondition` knows: one frozen record each.

Everything that differs between methods is a field here, read by ``_precondition.py``; the public
argument stays a string (``method="riemannian"``), looked up once by :func:`method_named`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import LoraPlusError
from .._role import Role

__all__ = ["LORAFA", "METHODS", "RIEMANNIAN", "Method", "method_named"]


@dataclass(frozen=True)
class Method:
    """What one preconditioning method does to a pair.

    Attributes:
        name: the string users pass as ``method=``.
        default_reg: the damping δ used when ``reg`` is not given (PEFT's values).
        preconditions: the sides whose gradients are rewritten (in the order they are solved).
        freezes_a: A is frozen with ``requires_grad_(False)``, so only B is updated and the
            optimizer must hold B.
        divides_by_scaling: B's preconditioned gradient is divided by s², s being the layer's
            LoRA scaling (so every pair needs one).
    """

    name: str
    default_reg: float
    preconditions: tuple[Role, ...]
    freezes_a: bool
    divides_by_scaling: bool


#: Zhang & Pilanci 2024; ``peft.optimizers.create_riemannian_optimizer(reg=1e-2)``.
RIEMANNIAN = Method("riemannian", 1e-2, (Role.A, Role.B), freezes_a=False, divides_by_scaling=False)
#: LoRA-FA; ``peft``'s ``LoraFAOptimizer`` (``delta = 1e-8``).
LORAFA = Method("lorafa", 1e-8, (Role.B,), freezes_a=True, divides_by_scaling=True)

#: Every method, by the name users pass.
METHODS: tuple[Method, ...] = (RIEMANNIAN, LORAFA)


def method_named(name: object) -> Method:
    """The record of the method called ``name``.

    Raises:
        LoraPlusError: ``name`` is not the name of a method (the message lists the valid ones).
    """
    for method in METHODS:
        if isinstance(name, str) and name == method.name:
            return method
    valid = ", ".join(repr(m.name) for m in METHODS)
    raise LoraPlusError(f"method must be one of {valid}, got {name!r}")
