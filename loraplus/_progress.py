"""The progress bar of long-running entry points (the demo, ``find_lr``): tqdm when installed, else a text bar."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["_TextBar", "_progress"]


class _TextBar:
    """A minimal progress bar on stderr when tqdm is not installed."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self._last = -1.0
        self._t0 = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.n >= self.total):
            self._last = now
            frac = self.n / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.desc} [{bar:<30}] {100 * frac:5.1f}% {now - self._t0:5.1f}s")
            sys.stderr.flush()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc, enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=True, mininterval=0.2)
