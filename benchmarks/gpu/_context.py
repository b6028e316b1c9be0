"""What a part of the kit is given: the device, toy sizes or not, its deadline, the log, a timer."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch


@dataclass(frozen=True)
class Context:
    """What a part is given: where it runs, whether at toy sizes, when it must stop, where to log."""

    device: torch.device
    smoke: bool
    deadline: float  # time.monotonic() by which the part has ended
    log_file: TextIO | None = None

    def left(self) -> float:
        """Seconds left before the part's deadline."""
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log_file is not None:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def seconds(self, fn: Callable[[], Any]) -> float:
        """Wall time of ``fn()``: CUDA events on a GPU (after a synchronize, so queued work is not
        hidden in it), ``perf_counter`` on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
