"""Checked optimizer resume: refuse a saved state that belongs to other groups or another model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

import torch

from .._errors import LoraPlusError
from .._layouts import canonical_name

__all__ = ["Rename", "check_state_dict", "load_optimizer_state"]

#: How the parameter names saved in a checkpoint map to the current ones: a dict of name segments
#: (``{"default": "sft"}`` replaces every dot-separated segment ``default`` of a saved name by ``sft``)
#: or a function from a saved name, as stored, to the current name.
Rename = Union[Mapping[str, str], Callable[[str], str]]  # Union: the package supports Python 3.9

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


@dataclass(frozen=True)
class _Mismatch:
    """One difference between the saved and the current groups; ``renamed`` holds the (saved, current)
    names of a group whose only difference is its parameter names."""

    text: str
    renamed: tuple[tuple[str, str], ...] = ()


def _check_groups(
    saved_groups: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]], rename: Callable[[str], str]
) -> list[_Mismatch]:
    problems: list[_Mismatch] = []
    if len(saved_groups) != len(groups):
        problems.append(
            _Mismatch(
                f"the checkpoint has {len(saved_groups)} param groups {_describe(saved_groups)} but the optimizer "
                f"has {len(groups)} {_describe(groups)}"
            )
        )
        return problems
    for i, (s, g) in enumerate(zip(saved_groups, groups)):
        tag = _tag(i, g)
        for key in ("role", "name"):
            if key in s and key in g and s[key] != g[key]:
                problems.append(_Mismatch(f"{tag}: saved {key} {s[key]!r}, current {key} {g[key]!r}"))
        n_saved, n_now = len(s["params"]), len(g["params"])
        if n_saved != n_now:
            problems.append(_Mismatch(f"{tag}: the checkpoint has {n_saved} parameters, the optimizer {n_now}"))
        # canonical names: a checkpoint saved under DDP (module.), torch.compile (_orig_mod.) or FSDP1
        # loads into the bare model and back
        if "param_names" in s and "param_names" in g:
            saved_names = [canonical_name(rename(n)) for n in s["param_names"]]
            names = [canonical_name(n) for n in g["param_names"]]
            if saved_names != names:
                text = f"{tag}: param_names differ at {_first_difference(saved_names, names)}"
                pairs = tuple((a, b) for a, b in zip(saved_names, names) if a != b)
                problems.append(_Mismatch(text, pairs if len(saved_names) == len(names) else ()))
    return problems


def _segment_map(saved_groups: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    """The segment map that turns every saved name into the current one, if one does (else None)."""
    found: dict[str, str] = {}
    pairs = [
        (canonical_name(a).split("."), canonical_name(b).split("."))
        for s, g in zip(saved_groups, groups)
        for a, b in zip(s.get("param_names", ()), g.get("param_names", ()))
    ]
    for saved, current in pairs:
        if len(saved) != len(current):
            return None
        for a, b in zip(saved, current):
            if a != b and found.setdefault(a, b) != b:
                return None
    if not found or any([found.get(x, x) for x in a] != b for a, b in pairs):
        return None
    return found


def _only_names_differ(renamed: Sequence[tuple[str, str]], hint: dict[str, str] | None, rename_given: bool) -> str:
    saved, current = renamed[0]
    if rename_given:
        what, how = "only names differ, even after rename=: saved (renamed)", "a rename= that maps each saved name"
    else:
        what = "only names differ: saved"
        how = f"rename={hint!r}" if hint is not None else "rename=<a function from each saved name to the current one>"
    return (
        f"the optimizer state does not match this optimizer's param groups: {what} {saved!r}, current "
        f"{current!r} ({len(renamed)} name{'s' if len(renamed) > 1 else ''}); the group count, group names and "
        "roles, parameter counts and the shapes of the saved state all match. If these are the same parameters "
        f"under new names (a renamed adapter, say), load it with loraplus.load_optimizer_state(optimizer, state_dict, "
        f"{how}); where something else loads it (the Trainer's resume), first rename the param_names saved in "
        "the checkpoint the same way"
    )


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


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *, rename: Rename | None = None
) -> None:
    """Load a saved optimizer state after checking it belongs to these param groups.

    ``torch.optim.Optimizer.load_state_dict`` matches saved state to parameters by position
    only: a checkpoint from another model, another LoRA rank or another grouping loads
    silently onto the wrong tensors (or fails much later). This checks, group by group, the
    count, ``role``, ``name``, ``param_names`` (kept in the state dict since torch 2.6; wrapper
    prefixes such as DDP's ``module.`` or torch.compile's ``_orig_mod.`` are ignored) and,
    for the per-parameter state entries that mirror the parameter (``exp_avg``,
    ``momentum_buffer``, …), the shapes — then calls ``optimizer.load_state_dict``.
    As with torch, the saved hyperparameters (``lr``, ``weight_decay``, …) replace the current ones.

    When everything matches but parameter names (an adapter renamed from ``default`` to ``sft``, say),
    the error says so ("only names differ: …"), with the ``rename=`` that loads it. ``rename`` maps
    the saved ``param_names`` to the current ones before they are compared: a dict of name segments
    (``{"default": "sft"}`` replaces each dot-separated segment equal to ``default``, so
    ``layers.0.lora_A.default.weight`` becomes ``layers.0.lora_A.sft.weight``; keys and values are single
    segments) or a function from a saved name, as stored, to the current name. Every other check
    still applies, the state is then loaded by position as torch does (the check has made sure that
    position ``j`` of each group holds the same parameter under its new name), and the optimizer's
    ``param_names`` become the renamed saved ones. Group names and roles are not renamed.

    Args:
        optimizer: the freshly built optimizer, e.g. from :func:`loraplus.LoraPlus`.
        state_dict: what ``optimizer.state_dict()`` returned when the checkpoint was saved.
        rename: how saved parameter names map to current ones (see above); None: they must match.

    Raises:
        LoraPlusError: listing every mismatch found (nothing is loaded then), or for a ``rename``
            that is neither a dict of segments nor a function, or given for a checkpoint without
            ``param_names``.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4)
        >>> saved = opt.state_dict()
        >>> loraplus.load_optimizer_state(opt, saved)
        >>> bigger = loraplus.LoraPlus(torch.optim.AdamW, loraplus.testing.tiny_lora_model(layers=3), lr=1e-4)
        >>> loraplus.load_optimizer_state(bigger, saved)
        Traceback (most recent call last):
        ...
        loraplus._errors.LoraPlusError: the optimizer state does not match this optimizer's param groups: ...
    """
    check_state_dict(optimizer, state_dict, rename=rename)
    if rename is not None:
        mapped = _as_function(rename)
        state_dict = {
            **state_dict,
            "param_groups": [
                {**g, "param_names": [mapped(n) for n in g["param_names"]]} if "param_names" in g else g
                for g in state_dict["param_groups"]
            ],
        }
    optimizer.load_state_dict(cast("dict[str, Any]", state_dict))  # torch annotates dict; any mapping works


def check_state_dict(
    optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *, rename: Rename | None = None
) -> None:
    """Raise :class:`LoraPlusError` unless ``state_dict`` belongs to ``optimizer``'s param groups.

    The checks of :func:`load_optimizer_state` (``rename`` as there), without loading; usable as a
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
    mapped = _as_function(rename)
    if rename is not None and not any("param_names" in g for g in saved_groups):
        raise LoraPlusError(
            "rename= maps the parameter names saved in the checkpoint, but its param groups carry no "
            "param_names (saved before torch 2.6, or by an optimizer that keeps none), so there is nothing to "
            "rename: load it without rename="
        )
    mismatches = _check_groups(saved_groups, groups, mapped)
    shapes = _check_shapes(state_dict["state"], saved_groups, groups) if all(m.renamed for m in mismatches) else []
    if mismatches and not shapes and all(m.renamed for m in mismatches):
        renamed = [pair for m in mismatches for pair in m.renamed]
        hint = _segment_map(saved_groups, groups) if rename is None else None
        raise LoraPlusError(_only_names_differ(renamed, hint, rename is not None))
    problems = [m.text for m in mismatches] + shapes
    if problems:
        raise LoraPlusError(
            "the optimizer state does not match this optimizer's param groups: "
            + "; ".join(problems)
            + ". The checkpoint was saved for another model, LoRA rank or grouping: rebuild the optimizer "
            "with the same model, adapters and LoraPlus options as when it was saved, or start the optimizer "
            "fresh and load only the model weights"
        )


def _as_function(rename: Rename | None) -> Callable[[str], str]:
    """``rename`` as a function from a saved name to the current one (validated)."""
    if rename is None:
        return _same
    if isinstance(rename, Mapping):
        bad = [
            (k, v)
            for k, v in rename.items()
            if not (isinstance(k, str) and isinstance(v, str) and k and v and "." not in k and "." not in v)
        ]
        if bad:
            raise LoraPlusError(
                f"rename maps single name segments (the parts between dots) to segments, e.g. "
                f"{{'default': 'sft'}}; got {bad[0][0]!r}: {bad[0][1]!r}. For other renamings pass a function "
                "from each saved name to the current one"
            )
        segments = dict(rename)
        return lambda name: ".".join(segments.get(seg, seg) for seg in name.split("."))
    if callable(rename):
        return _checked_call(rename)
    raise LoraPlusError(
        f"rename must be a dict of name segments (e.g. {{'default': 'sft'}}) or a function from a saved "
        f"parameter name to the current one, got {type(rename).__name__}"
    )


def _same(name: str) -> str:
    return name


def _checked_call(rename: Callable[[str], str]) -> Callable[[str], str]:
    def call(name: str) -> str:
        out = rename(name)  # the caller's own errors propagate unchanged
        if not isinstance(out, str):
            raise LoraPlusError(f"rename({name!r}) returned {type(out).__name__}, not the current name (a str)")
        return out

    return call
