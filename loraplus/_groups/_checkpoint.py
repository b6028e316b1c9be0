"""Checked optimizer resume: refuse a saved state that belongs to other groups or another model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from .._errors import LoraPlusError
from .._layouts import canonical_name

__all__ = ["load_state_dict"]

#: Per-parameter optimizer state entries that always have the parameter's shape (torch.optim,
#: bitsandbytes, torchao, schedulefree, lion-pytorch, pytorch-optimizer). Other entries (factored
#: Adafactor rows, quantisation scales, step counters) are not shape-checked.
PARAM_SHAPED_STATE = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "exp_inf",
        "momentum_buffer",
        "mu_product_buffer",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "sum",
        "ax",
        "prev",
        "step_size",
        "z",
        "state1",
        "state2",
        "exp_avg_diff",
        "previous_grad",
        "exp_avg_res",
    }
)

_SHOWN = 3


def _short(items: Sequence[Any]) -> str:
    head = ", ".join(repr(x) for x in items[:_SHOWN])
    return head + (f", … ({len(items)} in all)" if len(items) > _SHOWN else "")


def _first_difference(saved: Sequence[str], current: Sequence[str]) -> str:
    for i, (s, c) in enumerate(zip(saved, current)):
        if s != c:
            return f"position {i}: saved {s!r}, current {c!r}"
    extra_saved, extra_current = list(saved[len(current) :]), list(current[len(saved) :])
    if extra_saved:
        return f"the saved group also has {_short(extra_saved)}"
    return f"the current group also has {_short(extra_current)}"


def _tag(i: int, group: Mapping[str, Any]) -> str:
    name = group.get("name")
    return f"group {i}" + (f" ({name!r})" if name is not None else "")


def _describe(groups: Sequence[Mapping[str, Any]]) -> str:
    return "[" + ", ".join(f"{g.get('name', g.get('role', '?'))}: {len(g['params'])}" for g in groups) + "]"


def _check_groups(saved_groups: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]) -> list[str]:
    problems: list[str] = []
    if len(saved_groups) != len(groups):
        problems.append(
            f"the checkpoint has {len(saved_groups)} param groups {_describe(saved_groups)} but the optimizer has "
            f"{len(groups)} {_describe(groups)}"
        )
        return problems
    for i, (s, g) in enumerate(zip(saved_groups, groups)):
        tag = _tag(i, g)
        for key in ("role", "name"):
            if key in s and key in g and s[key] != g[key]:
                problems.append(f"{tag}: saved {key} {s[key]!r}, current {key} {g[key]!r}")
        n_saved, n_now = len(s["params"]), len(g["params"])
        if n_saved != n_now:
            problems.append(f"{tag}: the checkpoint has {n_saved} parameters, the optimizer {n_now}")
        # canonical names: a checkpoint saved under DDP (module.), torch.compile (_orig_mod.) or FSDP1
        # loads into the bare model and back
        saved_names = [canonical_name(n) for n in s.get("param_names", ())]
        names = [canonical_name(n) for n in g.get("param_names", ())]
        if "param_names" in s and "param_names" in g and saved_names != names:
            diff = _first_difference(saved_names, names)
            problems.append(f"{tag}: param_names differ at {diff}")
    return problems


def _state_items(entry: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A parameter's state entries, including those bitsandbytes packs into one nested dict."""
    items: list[tuple[str, Any]] = []
    for field, value in entry.items():
        if isinstance(value, Mapping):
            items.extend(value.items())
        else:
            items.append((field, value))
    return items


def _check_shapes(
    state: Mapping[Any, Any], saved_groups: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]
) -> list[str]:
    problems: list[str] = []
    for i, (s, g) in enumerate(zip(saved_groups, groups)):
        names = list(g.get("param_names", []))
        for j, (key, param) in enumerate(zip(s["params"], g["params"])):
            entry = state.get(key)
            if not isinstance(entry, Mapping):
                continue
            for field, value in _state_items(entry):
                if field in PARAM_SHAPED_STATE and isinstance(value, torch.Tensor) and value.dim() > 0:
                    if tuple(value.shape) != tuple(param.shape):
                        who = repr(names[j]) if j < len(names) else f"parameter {j}"
                        problems.append(
                            f"{_tag(i, g)}: {who} has shape {tuple(param.shape)} but its saved "
                            f"{field!r} has shape {tuple(value.shape)}"
                        )
                        break
    return problems


def load_state_dict(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Load a saved optimizer state after checking it belongs to these param groups.

    ``torch.optim.Optimizer.load_state_dict`` matches saved state to parameters by position
    only: a checkpoint from another model, another LoRA rank or another grouping loads
    silently onto the wrong tensors (or fails much later). This checks, group by group, the
    count, ``role``, ``name``, ``param_names`` (kept in the state dict since torch 2.6; wrapper
    prefixes such as DDP's ``module.`` or torch.compile's ``_orig_mod.`` are ignored) and,
    for the per-parameter state entries that mirror the parameter (``exp_avg``,
    ``momentum_buffer``, …), the shapes — then calls ``optimizer.load_state_dict``.
    As with torch, the saved hyperparameters (``lr``, ``weight_decay``, …) replace the current ones.

    Args:
        optimizer: the freshly built optimizer, e.g. from :func:`loraplus.LoraPlus`.
        state_dict: what ``optimizer.state_dict()`` returned when the checkpoint was saved.

    Raises:
        LoraPlusError: listing every mismatch found; nothing is loaded then.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4)
        >>> saved = opt.state_dict()
        >>> loraplus.load_state_dict(opt, saved)
        >>> bigger = loraplus.LoraPlus(torch.optim.AdamW, loraplus.testing.tiny_lora_model(layers=3), lr=1e-4)
        >>> loraplus.load_state_dict(bigger, saved)
        Traceback (most recent call last):
        ...
        loraplus._errors.LoraPlusError: the optimizer state does not match this optimizer's param groups: ...
    """
    check_state_dict(optimizer, state_dict)
    optimizer.load_state_dict(cast("dict[str, Any]", state_dict))  # torch annotates dict; any mapping works


def check_state_dict(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Raise :class:`LoraPlusError` unless ``state_dict`` belongs to ``optimizer``'s param groups.

    The checks of :func:`load_state_dict`, without loading; usable as a
    ``register_load_state_dict_pre_hook`` so that a load somebody else performs is checked too.
    """
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
        found = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise LoraPlusError(
            f"expected an optimizer state dict with 'state' and 'param_groups' (from optimizer.state_dict()), "
            f"got {found}; did you pass the model's state dict or the whole checkpoint?"
        )
    groups = getattr(optimizer, "param_groups", None)
    if groups is None or not hasattr(optimizer, "load_state_dict"):
        raise LoraPlusError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(g, Mapping) and "params" in g for g in saved_groups
    ):
        raise LoraPlusError(
            "the state dict's 'param_groups' must be a list of dicts with 'params' (as optimizer.state_dict() "
            f"writes it), got {type(saved_groups).__name__}"
        )
    problems = _check_groups(saved_groups, groups)
    if not problems:
        problems = _check_shapes(state_dict["state"], saved_groups, groups)
    if problems:
        raise LoraPlusError(
            "the optimizer state does not match this optimizer's param groups: "
            + "; ".join(problems)
            + ". The checkpoint was saved for another model, LoRA rank or grouping: rebuild the optimizer "
            "with the same model, adapters and LoraPlus options as when it was saved, or start the optimizer "
            "fresh and load only the model weights"
        )
