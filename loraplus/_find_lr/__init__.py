"""``loraplus.find_lr``: a short learning-rate and ratio probe that leaves the model as it found it.

* :mod:`._restore` — one snapshot of the model's trainable state, buffers, flags, grads and RNGs.
* :mod:`._probe` — the range test and the confirmation run of one ratio, and :func:`find_lr`.
* :mod:`._suggestion` — the :class:`LrSuggestion` record, its ``explain()`` and ``plot()``.
"""

from __future__ import annotations

from ._probe import find_lr
from ._suggestion import LrSuggestion, Phase, ProbePoint, RatioSummary, Rule

__all__ = ["LrSuggestion", "Phase", "ProbePoint", "RatioSummary", "Rule", "find_lr"]
