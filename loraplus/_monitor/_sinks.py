"""Sinks: where the Monitor streams each sampled step's records as they are made (CSV, JSON lines, TensorBoard).

A sink has ``write(step, rows, lrs)``, ``flush()`` and ``close()``. File sinks append (a header is
written only to a new or empty CSV file), so a resumed run continues the first run's file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

import torch

from .._errors import LoraPlusError

__all__ = ["CsvSink", "JsonlSink", "TensorBoardSink", "open_tensorboard", "write_csv", "write_jsonl"]


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def write_csv(fh: IO[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str], header: bool) -> None:
    writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)


def write_jsonl(fh: IO[str], rows: Sequence[Mapping[str, Any]]) -> None:
    fh.writelines(json.dumps(_clean(row)) + "\n" for row in rows)


class _FileSink:
    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fh: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self._fh is None:
            self._fh = open(self.path, "a", newline="")
        return self._fh

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()

    def __repr__(self) -> str:
        return f"{self.name} {self.path!r}"


class CsvSink(_FileSink):
    """Appends one CSV row per adapter and sampled step; the header goes to a new (empty) file only."""

    name = "CSV"

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        super().__init__(path)
        self.columns = list(columns)

    def write(self, step: int, rows: Sequence[Mapping[str, Any]], lrs: Mapping[str, float]) -> None:
        fh = self._open()
        write_csv(fh, rows, self.columns, header=fh.tell() == 0)
        fh.flush()


class JsonlSink(_FileSink):
    """Appends one JSON object per adapter and sampled step (NaN as null)."""

    name = "JSON lines"

    def write(self, step: int, rows: Sequence[Mapping[str, Any]], lrs: Mapping[str, float]) -> None:
        fh = self._open()
        write_jsonl(fh, rows)
        fh.flush()


class TensorBoardSink:
    """``loraplus/<metric>/<layer>[<adapter>]`` per record, ``loraplus/median/<metric>``, ``loraplus/lr/<group>``."""

    name = "TensorBoard"

    def __init__(self, writer: Any, metrics: Sequence[str], own: bool) -> None:
        self.writer = writer
        self.metrics = tuple(metrics)
        self.own = own

    def write(self, step: int, rows: Sequence[Mapping[str, Any]], lrs: Mapping[str, float]) -> None:
        w = self.writer
        for row in rows:
            key = f"{row['layer']}[{row['adapter']}]" if row["adapter"] else row["layer"]
            for m in self.metrics:
                w.add_scalar(f"loraplus/{m}/{key}", row[m], step)
        for m in self.metrics:
            vals = [row[m] for row in rows if row[m] == row[m]]
            if vals:
                w.add_scalar(f"loraplus/median/{m}", float(torch.tensor(vals).median()), step)
        for name, lr in lrs.items():
            w.add_scalar(f"loraplus/lr/{name}", lr, step)

    def flush(self) -> None:
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    def close(self) -> None:
        if self.own:
            self.writer.close()
        else:
            self.flush()

    def __repr__(self) -> str:
        return f"TensorBoard writer {type(self.writer).__name__}"


def open_tensorboard(tensorboard: Any, metrics: Sequence[str]) -> TensorBoardSink | None:
    """A sink for ``tensorboard=``: a ``SummaryWriter`` (anything with ``add_scalar``) or a log directory."""
    if tensorboard is None:
        return None
    if callable(getattr(tensorboard, "add_scalar", None)):
        return TensorBoardSink(tensorboard, metrics, own=False)
    if isinstance(tensorboard, (str, os.PathLike)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise LoraPlusError(
                f"tensorboard= needs the tensorboard package ({err}); pip install tensorboard "
                "(or loraplus[tensorboard])"
            ) from None
        return TensorBoardSink(SummaryWriter(log_dir=os.fspath(tensorboard)), metrics, own=True)
    raise LoraPlusError(
        f"tensorboard= must be a SummaryWriter (anything with add_scalar) or a log directory, "
        f"got {type(tensorboard).__name__}"
    )
