"""The records :func:`loraplus.find_lr` returns: :class:`LrSuggestion`, with one
:class:`RatioSummary` per ratio tried and the :class:`ProbePoint` measurements, each tagged
with its :class:`Phase`.
"""

from __future__ import annotations

from ._find_lr import LrSuggestion, Phase, ProbePoint, RatioSummary, Rule

__all__ = ["LrSuggestion", "Phase", "ProbePoint", "RatioSummary", "Rule"]
