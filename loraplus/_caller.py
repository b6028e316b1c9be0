"""Where a warning should point: the first frame outside loraplus (and whatever else wraps the call)."""

from __future__ import annotations

import os
import sys

__all__ = ["PACKAGE_DIR", "stacklevel_outside"]

#: The directory of the loraplus package: frames from files under it are never the user's.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def stacklevel_outside(*also: str) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by this function's caller that names the first
    frame outside loraplus and the directories ``also`` (e.g. torch's, around ``opt.step()``): the
    user's line, however many internal calls, wrappers and class constructors lie in between."""
    inside = (PACKAGE_DIR, *also)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
