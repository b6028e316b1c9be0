"""A readable table of what goes where (a dry run of LoraPlus)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .._errors import LoraPlusError
from .._labels import NoDecaySpec, RuleSpec, is_no_decay, normalize_no_decay
from .._role import Role
from .._table import render_table
from ._build import DEFAULT_RATIO, prepare

__all__ = ["explain"]


def _fmt_lr(value: Any, relative: bool) -> str:
    if relative:
        v = float(value)
        return "lr" if v == 1.0 else f"{v:g}·lr"
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


def _group_rows(groups: Sequence[Mapping[str, Any]], relative: bool) -> list[list[str]]:
    rows = []
    for i, g in enumerate(groups):
        params = list(g["params"])
        names = list(g.get("param_names", []))
        wd = g.get("weight_decay")
        rows.append(
            [
                str(g.get("name", i)),
                str(g.get("role", "?")),
                _fmt_lr(g.get("lr"), relative),
                "default" if wd is None else f"{float(wd):g}",
                str(len(params)),
                f"{sum(p.numel() for p in params):,}",
                names[0] if names else "",
            ]
        )
    return rows


def explain(
    target: nn.Module | Any,
    *,
    lr: float | None = None,
    ratio: float | None = None,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
    weight_decay: float | None = None,
    rules: RuleSpec | None = None,
    no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
    verbose: bool = False,
) -> str:
    """Describe the LoRA+ grouping of a model (a dry run) or of an optimizer built by :func:`LoraPlus`.

    Args:
        target: a model (the options below are those of :func:`param_groups`) or an optimizer.
        lr: shown as absolute rates; when ``None`` rates are shown relative to ``lr``.
        ratio: λ (default: :data:`loraplus.DEFAULT_RATIO`).
        verbose: also list every trainable parameter with its role, why it got it, and its decay.

    An optimizer already has its groups, so with one only ``verbose`` applies: the grouping
    options (``lr``, ``ratio``, ``lr_embedding``, ``role_lr``, ``weight_decay``, ``rules``,
    ``no_decay``) are refused rather than ignored.

    Returns:
        A plain-text table: one row per group (role, lr, weight decay, tensors, elements,
        first parameter), then counts per role and the frozen parameters left out.

    Raises:
        LoraPlusError: a target that is neither a model nor an optimizer, absolute rates
            (``role_lr``, ``lr_embedding``) without ``lr``, or grouping options given with an optimizer.

    Example:
        >>> import loraplus
        >>> print(loraplus.explain(loraplus.testing.tiny_lora_model(), ratio=16))  # doctest: +ELLIPSIS
        LoRA+ groups (ratio 16, rates relative to lr)
        group           role   lr     weight_decay  tensors  elements  first parameter
        ...
    """
    headers = ["group", "role", "lr", "weight_decay", "tensors", "elements", "first parameter"]
    right = {4, 5}
    if isinstance(target, nn.Module):
        ratio = DEFAULT_RATIO if ratio is None else ratio
        relative = lr is None
        if relative and (role_lr or lr_embedding is not None):
            raise LoraPlusError(
                "role_lr and lr_embedding are absolute learning rates: pass lr= too, so explain() can show "
                "every group's rate (without lr=, rates are shown as multiples of lr)"
            )
        labels, groups = prepare(
            target,
            lr=1.0 if lr is None else lr,
            ratio=ratio,
            lr_embedding=lr_embedding,
            role_lr=role_lr,
            weight_decay=weight_decay,
            rules=rules,
            no_decay=no_decay,
        )
        title = f"LoRA+ groups (ratio {ratio:g}, " + ("rates relative to lr)" if relative else f"lr {lr:g})")
        frozen = [(n, p) for n, p in target.named_parameters() if not p.requires_grad]
        parts = [title, render_table(headers, _group_rows(groups, relative), right)]
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab.role.value] = counts.get(lab.role.value, 0) + 1
        parts.append("tensors per role: " + ", ".join(f"{r.value} {counts[r.value]}" for r in Role if r.value in counts))
        parts.append(
            f"frozen (not in the optimizer): {len(frozen)} tensors, {sum(p.numel() for _, p in frozen):,} elements"
        )
        if verbose:
            nd = normalize_no_decay(no_decay)
            rows = [[lab.name, lab.role.value, "no" if is_no_decay(lab, nd) else "yes", lab.source] for lab in labels]
            parts.append(render_table(["parameter", "role", "decay", "why"], rows, set()))
        return "\n".join(parts)
    opt_groups = getattr(target, "param_groups", None)
    if not isinstance(opt_groups, list):
        raise LoraPlusError(f"explain() takes a model or an optimizer, got {type(target).__name__}")
    options = {"lr": lr, "ratio": ratio, "lr_embedding": lr_embedding, "role_lr": role_lr,
               "weight_decay": weight_decay, "rules": rules, "no_decay": no_decay}
    given = [f"{k}=" for k, v in options.items() if v is not None]
    if given:
        raise LoraPlusError(
            f"explain() got {', '.join(given)} with an optimizer ({type(target).__name__}), whose param groups "
            "are already built, so they would change nothing in the table: call explain(optimizer) without them "
            "to see its groups, or explain(model, " + ", ".join(f"{k}..." for k in given) + ") for a dry run "
            "of LoraPlus with those options"
        )
    parts = [f"{type(target).__name__} param groups", render_table(headers, _group_rows(opt_groups, False), right)]
    if verbose:
        rows = [
            [name, str(g.get("role", "?")), str(g.get("name", i))]
            for i, g in enumerate(opt_groups)
            for name in g.get("param_names", [])
        ]
        parts.append(render_table(["parameter", "role", "group"], rows, set()))
    return "\n".join(parts)
