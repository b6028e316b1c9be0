"""The Monitor's records: named records per adapter and step, and a bounded in-memory history."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AdapterInfo", "History", "StepRecord"]


@dataclass(frozen=True)
class AdapterInfo:
    """What every record of one monitored adapter repeats: who it is and how ΔW is read.

    Attributes:
        key: ``layer[adapter]`` (``layer`` where the layout has no adapter name).
        layer, adapter, layer_group: as in :class:`loraplus.pairing.Pair`.
        scale: the LoRA scaling s included in the ΔW terms; ``None`` where the layout does not
            record it (the terms are then those of B·A, s = 1).
        group_a, group_b: indices of the param groups holding A and B.
    """

    key: str
    layer: str
    adapter: str
    layer_group: str
    scale: float | None
    group_a: int
    group_b: int


@dataclass(frozen=True)
class StepRecord:
    """One sampled optimizer step.

    Attributes:
        step: the 0-based count of ``optimizer.step()`` calls (continued across a resume).
        lrs: ``{group name: lr}`` in force for this step.
        group_lrs: the same rates by param-group index.
        values: (adapters, metrics) float64 on the CPU, NaN where a term is missing.
    """

    step: int
    lrs: Mapping[str, float]
    group_lrs: tuple[float, ...]
    values: torch.Tensor

    def rows(self, adapters: Sequence[AdapterInfo], metrics: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The flat per-adapter dicts (the public record format)."""
        group_lrs = self.group_lrs
        for info, vals in zip(adapters, self.values.tolist()):
            row: dict[str, Any] = {
                "step": self.step,
                "layer": info.layer,
                "adapter": info.adapter,
                "layer_group": info.layer_group,
                "scale": info.scale,
            }
            row.update(zip(metrics, vals))
            row["lr_A"] = group_lrs[info.group_a]
            row["lr_B"] = group_lrs[info.group_b]
            yield row


class History:
    """The last ``keep`` sampled steps (all of them with ``keep=None``), and views of them."""

    def __init__(self, adapters: Sequence[AdapterInfo], metrics: Sequence[str], keep: int | None) -> None:
        self.adapters = tuple(adapters)
        self.metrics = tuple(metrics)
        self.steps: deque[StepRecord] = deque(maxlen=keep)
        self._flat: list[dict[str, Any]] | None = None

    def add(self, record: StepRecord) -> None:
        self.steps.append(record)
        self._flat = None

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per kept step and adapter (built once per new step)."""
        if self._flat is None:
            self._flat = [row for rec in self.steps for row in rec.rows(self.adapters, self.metrics)]
        return list(self._flat)

    def lrs(self) -> list[dict[str, Any]]:
        return [{"step": rec.step, **rec.lrs} for rec in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """``{"step": (S,), "layer": [L keys], <metric>: (S, L), "lr": {group: (S,)}}``, float64, NaN where missing."""
        n = len(self.adapters)
        stacked = (
            torch.stack([rec.values for rec in self.steps])
            if self.steps
            else torch.empty(0, n, len(self.metrics), dtype=torch.float64)
        )
        out: dict[str, Any] = {
            "step": torch.tensor([rec.step for rec in self.steps], dtype=torch.long),
            "layer": [a.key for a in self.adapters],
        }
        for j, m in enumerate(self.metrics):
            out[m] = stacked[:, :, j].clone()
        groups: list[str] = []
        for rec in self.steps:
            groups += [g for g in rec.lrs if g not in groups]
        out["lr"] = {
            g: torch.tensor([float(rec.lrs.get(g, math.nan)) for rec in self.steps], dtype=torch.float64)
            for g in groups
        }
        return out

    def state(self) -> list[dict[str, Any]]:
        return [
            {"step": rec.step, "lrs": dict(rec.lrs), "group_lrs": list(rec.group_lrs), "values": rec.values.clone()}
            for rec in self.steps
        ]

    def load(self, saved: Sequence[Mapping[str, Any]]) -> None:
        self.steps.clear()
        for rec in saved:
            values = torch.as_tensor(rec["values"], dtype=torch.float64)
            if tuple(values.shape) != (len(self.adapters), len(self.metrics)):
                raise ValueError(
                    f"saved values of step {rec['step']} have shape {tuple(values.shape)}, expected "
                    f"({len(self.adapters)}, {len(self.metrics)})"
                )
            lrs = dict(rec["lrs"])
            self.steps.append(StepRecord(int(rec["step"]), lrs, tuple(rec["group_lrs"]), values))
        self._flat = None
