"""The records :func:`loraplus.pairs` and :func:`loraplus.precondition` hand back, and the lower-level
pairing and preconditioner functions: :class:`Pair`, :class:`Pairs`, :class:`Unpaired` (with its :class:`Why`),
:func:`pair_params`, :class:`Preconditioner` and :func:`preconditioner`.
"""

from __future__ import annotations

from ._pairs._pairs import Pair, Pairs, Unpaired, Why
from ._pairs._params import pair_params
from ._pairs._precondition import Preconditioner, preconditioner

__all__ = ["Pair", "Pairs", "Preconditioner", "Unpaired", "Why", "pair_params", "preconditioner"]
