"""The scheduler catalogue as the Markdown table docs/compatibility.md shows (tests keep the page equal to it)."""

from __future__ import annotations

from collections.abc import Sequence

from .._table import render_markdown_table
from ._scheduler_catalog import SCHEDULERS, TORCH_SCHEDULERS, Bound, Carry, Fix, PerGroup, SchedulerRecord

__all__ = ["scheduler_table"]

_HEADERS = (
    "scheduler",
    "keys it writes into the groups",
    "its per-group lists",
    "scalar arguments that break the ratio: fix",
    "the same, built before `apply_to_optimizer`",
    "drives",
)

_FIX = {
    Fix.PER_GROUP: "pass `loraplus.scheduler_bounds(opt, value)`",
    Fix.LAMBDA_FLOOR: "no list accepted: use a LambdaLR floor (below)",
    Fix.HARMLESS: "set it to `{harmless:g}`",
}


def _values(items: Sequence[PerGroup], none: str) -> str:
    parts = []
    for carry in Carry:
        names = [f"`{p.name}`" for p in items if p.carry is carry]
        if names:
            parts.append(f"{', '.join(names)} ({carry.value})")
    return "; ".join(parts) or none


def _bound(b: Bound) -> str:
    when = f"`{b.argument}`" if b.harmless is None else f"`{b.argument} ≠ {b.harmless:g}`"
    return f"{when}: {_FIX[b.fix].format(harmless=b.harmless)}"


def _before_apply(b: Bound) -> str:
    if b.stored_as is None:
        return f"`{b.argument}`: ratio lost (one scalar)"
    return f"`{b.argument}`: kept (`{b.stored_as}` is scaled)"


def _row(rec: SchedulerRecord) -> list[str]:
    name = rec.name if rec.module == TORCH_SCHEDULERS else f"{rec.module}.{rec.name}"  # torch's own: short
    return [
        f"`{name}`",
        _values(rec.group_keys, "those of the schedulers it drives" if rec.children else "none: no mark on the groups"),
        _values(rec.lists, "none"),
        "<br>".join(_bound(b) for b in rec.bounds) or "none",
        "<br>".join(_before_apply(b) for b in rec.bounds),
        f"`{rec.children}`" if rec.children else "",
    ]


def scheduler_table(records: Sequence[SchedulerRecord] = SCHEDULERS) -> str:
    """The records as a Markdown table: one row per scheduler type, in catalogue order."""
    return render_markdown_table(_HEADERS, [_row(r) for r in records])
