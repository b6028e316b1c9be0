"""The one exception type raised by loraplus."""

from __future__ import annotations

__all__ = ["LoraPlusError"]


class LoraPlusError(ValueError):
    """Raised for every invalid input to a loraplus entry point.

    It subclasses :class:`ValueError`, so code that already catches ``ValueError``
    around optimizer construction keeps working. The message always says what was
    found, why it was rejected and how to fix it.
    """
