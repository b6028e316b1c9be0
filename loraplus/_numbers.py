"""One validator for every number a user passes (learning rates, ratios, decay, damping)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, overload

from ._errors import LoraPlusError

__all__ = ["check_number", "check_product"]


@overload
def check_number(name: str, value: Any, *, allow_none: Literal[False] = ..., allow_zero: bool = ...) -> float: ...
@overload
def check_number(name: str, value: Any, *, allow_none: bool, allow_zero: bool = ...) -> float | None: ...
def check_number(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> float | None:
    """Validate a finite real number that must be positive (or non-negative) and return it as ``float``.

    Accepts Python and NumPy scalars (``np.float32(1e-2)``); refuses strings (with the conversion to
    make), booleans, tensors (with what to pass instead), NaN, infinities and out-of-range values.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        raise LoraPlusError(
            f"{name} must be a number, got the string {value!r}; YAML and CLI values arrive as strings — "
            f"convert them first, e.g. {name}=float({value!r})"
        )
    if type(value).__module__ == "torch" or type(value).__name__ in ("Tensor", "Parameter"):
        raise LoraPlusError(
            f"{name} must be a plain number, got a {type(value).__name__}: pass {name}=float(value) "
            f"(or value.item()); the optimizer's own tensor-lr options (capturable, fused) are set by it, not here"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LoraPlusError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise LoraPlusError(f"{name} must be finite, got {out!r}")
    if out < 0 or (out == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise LoraPlusError(f"{name} must be {bound}, got {out!r}")
    return out


def check_product(what: str, value: float) -> float:
    """A value computed from validated numbers (``lr × ratio``) must still be finite and non-zero."""
    if not math.isfinite(value) or value == 0:
        raise LoraPlusError(f"{what} = {value!r} is not a usable learning rate; use a smaller lr or ratio")
    return value
