"""The ratio guard: at every step, check that each group still trains at the rate LoRA+ gave it.

LoRA+ is one promise: B trains at ``ratio ×`` its A's rate at *every* step. :func:`loraplus.LoraPlus`,
:func:`loraplus.apply_to_optimizer` and the Trainer integration set the rates once; schedulers, lr finders,
hand-written warm-ups and some optimizers rewrite them afterwards. The guard is a step pre-hook that
compares, before each step, every constrained group's ``lr`` with its reference group's ``lr`` times
the factor recorded when the groups were built. It reads only the group dicts (no tensor work: a lr
held in a tensor on an accelerator is skipped, never synchronised), holds nothing of the optimizer
(torch passes the optimizer to the hook), and follows groups by name, so a ``load_state_dict`` that
replaces the group dicts, or a wrapper (DDP, FSDP, DeepSpeed, accelerate) that steps the same
optimizer, keeps it working.

On the first violation it warns once (``guard="warn"``) or raises :class:`~loraplus.LoraPlusError`
before the step is taken (``guard="raise"``), naming the group, both rates, the probable cause and
the fix.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .._caller import stacklevel_outside
from .._errors import LoraPlusError
from .._role import Role, group_role
from ._scheduler_catalog import scaled_group_keys, start_keys

__all__ = ["Cause", "Guard", "GuardMode", "Relation", "Violation", "attach_guard", "guard", "relations_of"]

#: The attribute of an optimizer instance that holds its guard (the optimizer owns it).
_LINK = "_loraplus_guard"
#: torch's own frames (Optimizer.step's hooks) are skipped too when a warning looks for the user's line
_TORCH_DIR = os.path.dirname(torch.__file__)

#: Relative tolerance of the check: schedulers multiply every group by the same float, so the
#: ratio stays exact to a few ulps; anything a rewrite breaks is off by far more.
REL_TOL = 1e-6

#: Group keys that schedulers write into the groups as bounds (OneCycleLR's ``max_lr``/``min_lr``,
#: SWALR's ``swa_lr``, the ``initial_lr`` every torch scheduler records), from the scheduler catalogue:
#: when a constrained group and its reference hold the same value there, a scalar bound was given
#: where a per-group one was needed.
BOUND_KEYS: tuple[str, ...] = (
    *(k for k in scaled_group_keys() if k != "lr" and k not in start_keys()),
    *start_keys(),  # last: every scheduler records it, a named bound says more
)


class GuardMode(str, Enum):
    """What the guard does on a violation."""

    #: Warn once (the first violation) and let training go on.
    WARN = "warn"
    #: Raise :class:`~loraplus.LoraPlusError` before the optimizer steps with the wrong rates.
    RAISE = "raise"


class Cause(Enum):
    """The probable cause of a violation, read off the groups (not a certainty: the message says "probably")."""

    #: Every checked group holds one rate: a loop wrote one value into every group.
    ONE_RATE = "one_rate"
    #: The group and its reference hold the same scheduler bound (``max_lr``, ``swa_lr``, ``initial_lr``, …).
    SCALAR_BOUND = "scalar_bound"
    #: Something else rewrote the rates (a scheduler floor such as ``eta_min``, an optimizer, user code).
    UNKNOWN = "unknown"

    @property
    def explanation(self) -> str:
        return _EXPLANATIONS[self]


_EXPLANATIONS: Mapping[Cause, str] = {
    Cause.ONE_RATE: (
        "every group now has the same learning rate, so probably code wrote one rate into every group "
        "(an lr finder such as Lightning's Tuner.lr_find or torch-lr-finder, a hand-written warm-up "
        "`for g in opt.param_groups: g['lr'] = x`, or a trainer doing so). Fix: scale each group instead "
        "(`g['lr'] = g['initial_lr'] * factor`), or use a torch scheduler (LambdaLR keeps the ratio)"
    ),
    Cause.SCALAR_BOUND: (
        "the group and its reference hold the same {key}={value:g}, so probably a scheduler was given one "
        "scalar bound for every group (OneCycleLR max_lr=, CyclicLR base_lr=/max_lr=, SWALR swa_lr=, "
        "ReduceLROnPlateau min_lr=). Fix: pass one value per group, loraplus.scheduler_bounds(opt, value)"
    ),
    Cause.UNKNOWN: (
        "probably a scheduler with one scalar floor for every group (CosineAnnealingLR eta_min>0, "
        "ReduceLROnPlateau min_lr=), an optimizer that rewrites its groups' rates, or code that sets one "
        "group's rate. Fix: give a floor as a fraction of each group's rate (LambdaLR, transformers' "
        "get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=)) or one bound per group "
        "(loraplus.scheduler_bounds(opt, value)), and scale every group by the same factor; see docs/compatibility.md"
    ),
}


@dataclass(frozen=True)
class Relation:
    """One promise the guard checks: ``lr(group) == factor × lr(reference)``."""

    index: int
    group: str
    reference_index: int
    reference: str
    factor: float
    role: Role | None


@dataclass(frozen=True)
class Violation:
    """A broken relation, as found before a step."""

    relation: Relation
    lr: float
    reference_lr: float
    cause: Cause
    step: int

    @property
    def expected(self) -> float:
        return self.relation.factor * self.reference_lr

    def message(self, groups: Sequence[Mapping[str, Any]] | None = None) -> str:
        rel = self.relation
        what = f" ({rel.role.value} parameters)" if rel.role is not None else ""
        explanation = self.cause.explanation
        if self.cause is Cause.SCALAR_BOUND and groups is not None:
            key, value = _shared_bound(groups, rel)
            explanation = explanation.format(key=key, value=value)
        return (
            f"LoRA+ ratio broken before step {self.step}: group {rel.group!r}{what} has lr={self.lr:g} but should "
            f"have {rel.factor:g} × the lr of group {rel.reference!r} ({self.reference_lr:g}) = {self.expected:g}; "
            f"{explanation}. (The loraplus ratio guard: guard=None turns it off, "
            f"loraplus.groups.guard(opt).remove() detaches it.)"
        )


def _lr_value(group: Mapping[str, Any]) -> float | None:
    lr = group.get("lr")
    if type(lr) is float:  # the common case first: this runs before every step
        return lr
    if isinstance(lr, torch.Tensor):
        if lr.device.type != "cpu" or lr.numel() != 1:
            return None  # reading it would synchronise with the device
        return float(lr)
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):  # NumPy scalars too
        return float(lr)
    return None


def _shared_bound(groups: Sequence[Mapping[str, Any]], rel: Relation) -> tuple[str, float]:
    if not 0 <= rel.reference_index < len(groups):
        return "", math.nan  # the reference is not in this view (one group at a time)
    g, ref = groups[rel.index], groups[rel.reference_index]
    for key in BOUND_KEYS:
        a, b = g.get(key), ref.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b and a != 0:
            return key, float(a)
    return "", math.nan


def _close(value: float, expected: float) -> bool:
    # math.isclose(value, expected, rel_tol=REL_TOL), inlined: this runs before every step
    return value == expected or abs(value - expected) <= REL_TOL * max(abs(value), abs(expected))


class Guard:
    """The ratio guard attached to one optimizer (see :func:`loraplus.groups.guard`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, relations: Sequence[Relation], mode: GuardMode):
        self.mode = mode
        self.relations = tuple(relations)
        #: The first violation found (``None`` while the ratio has held).
        self.violation: Violation | None = None
        #: How many checks found at least one violation.
        self.violations = 0
        self._steps = 0
        self._seen: dict[str, float | None] = {}  # each reference group's rate, as last seen
        self._handle: RemovableHandle | None = optimizer.register_step_pre_hook(_hook)
        setattr(optimizer, _LINK, self)

    def __repr__(self) -> str:
        state = "attached" if self.active else "removed"
        return f"Guard({self.mode.value!r}, {len(self.relations)} relations, {self.violations} violations, {state})"

    @property
    def active(self) -> bool:
        """Whether the hook is still attached."""
        return self._handle is not None

    def check(self, optimizer: Any) -> list[Violation]:
        """Every relation broken in ``optimizer``'s groups now (what the hook runs before each step).

        DeepSpeed's ZeRO stages 1 and 2 step the optimizer one group at a time, with
        ``param_groups`` set to that group alone, in group order; every reference group comes before
        the groups that follow it, so a group is then compared with its reference's rate as last seen.
        """
        groups = optimizer.param_groups
        n = len(groups)
        by_name: dict[str, int] | None = None
        seen = self._seen
        found: list[Violation] = []
        for rel in self.relations:
            i, r = rel.index, rel.reference_index
            if i < n and r < n and groups[i].get("name") == rel.group and groups[r].get("name") == rel.reference:
                lr, ref = _lr_value(groups[i]), _lr_value(groups[r])
                seen[rel.reference] = ref
            else:  # the groups were reordered, replaced or are shown one at a time: follow them by name
                if by_name is None:
                    by_name = {str(g.get("name")): k for k, g in enumerate(groups) if "name" in g}
                    for name, k in by_name.items():
                        seen[name] = _lr_value(groups[k])
                if rel.group not in by_name:
                    continue  # not in this view, or gone
                i = by_name[rel.group]
                r = by_name.get(rel.reference, -1)
                lr, ref = _lr_value(groups[i]), seen.get(rel.reference)
            if lr is None or ref is None or _close(lr, rel.factor * ref):
                continue
            moved = Relation(i, rel.group, r, rel.reference, rel.factor, rel.role)
            found.append(Violation(moved, lr, ref, _cause(groups, moved, seen), max(self._steps - 1, 0)))
        return found

    def _pre_step(self, optimizer: Any) -> None:
        if self._counts_a_step(optimizer.param_groups):
            self._steps += 1
        found = self.check(optimizer)
        if not found:
            return
        self.violations += 1
        first = found[0]
        warned = self.violation is not None
        if not warned:
            self.violation = first
        if self.mode is GuardMode.RAISE:
            raise LoraPlusError(first.message(optimizer.param_groups))
        if not warned:
            more = f" ({len(found) - 1} other group(s) too)" if len(found) > 1 else ""
            # at the user's opt.step() line: schedulers and accelerate wrap step, so the depth varies
            level = stacklevel_outside(_TORCH_DIR)
            warnings.warn(first.message(optimizer.param_groups) + more, UserWarning, stacklevel=level)

    def _counts_a_step(self, groups: Sequence[Mapping[str, Any]]) -> bool:
        # one step per view that holds the first reference group (a one-group-at-a-time view holds it once)
        if not self.relations:
            return True
        rel = self.relations[0]
        if rel.reference_index < len(groups) and groups[rel.reference_index].get("name") == rel.reference:
            return True
        return any(g.get("name") == rel.reference for g in groups)

    def remove(self) -> None:
        """Detach the guard; idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _cause(groups: Sequence[Mapping[str, Any]], rel: Relation, seen: Mapping[str, float | None]) -> Cause:
    key, _ = _shared_bound(groups, rel)
    if key:
        return Cause.SCALAR_BOUND
    rates = {**seen, **{str(g.get("name")): _lr_value(g) for g in groups}}
    if len(rates) > 1 and len(set(rates.values())) == 1 and None not in rates.values():
        return Cause.ONE_RATE
    return Cause.UNKNOWN


def _hook(optimizer: Any, args: tuple, kwargs: dict) -> None:
    # a plain function: it holds neither the optimizer (torch passes it) nor the guard (the optimizer does)
    found = vars(optimizer).get(_LINK)
    if isinstance(found, Guard) and found.active:
        found._pre_step(optimizer)


def guard(optimizer: Any) -> Guard | None:
    """The ratio guard attached to ``optimizer`` (by ``LoraPlus``, ``apply_to_optimizer`` or the Trainer), or ``None``.

    Wrappers that expose the optimizer as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``,
    DeepSpeed's ZeRO optimizers) are looked through.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3)
        >>> loraplus.groups.guard(opt)
        Guard('warn', 3 relations, 0 violations, attached)
        >>> loraplus.groups.guard(opt).remove()
        >>> loraplus.groups.guard(opt) is None
        True
    """
    for obj in _chain(optimizer):
        found = vars(obj).get(_LINK) if hasattr(obj, "__dict__") else None
        if isinstance(found, Guard):
            return found if found.active else None
    return None


def _chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps as ``.optimizer`` (accelerate, DeepSpeed), outermost first."""
    out: list[Any] = []
    while optimizer is not None and all(optimizer is not o for o in out):
        out.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def coerce_mode(value: Any) -> GuardMode | None:
    """``"warn"``/``"raise"``/``GuardMode``/``None`` → the mode; anything else is refused."""
    if value is None or isinstance(value, GuardMode):
        return value
    if isinstance(value, str):
        for mode in GuardMode:
            if value == mode.value:
                return mode
    raise LoraPlusError(f"guard must be 'warn', 'raise' or None, got {value!r}")


def relations_of(groups: Sequence[Mapping[str, Any]]) -> list[Relation]:
    """The relations LoRA+ set between these groups.

    Groups that ``apply_to_groups``/``apply_to_optimizer`` made carry ``{"loraplus": {"parent": name, "scale": f}}``: each
    sibling follows its parent at ``f``. Groups that ``LoraPlus``/``param_groups`` built carry ``role``:
    every group follows the first A group (else the first embedding-A group, else the first group) at
    the ratio of their rates when built. Groups without a name are not followed.
    """
    from ._refine import MARK  # a sibling module; imported here to keep the import graph one-way

    names = [g.get("name") for g in groups]
    index = {str(n): i for i, n in enumerate(names) if n is not None}
    out: list[Relation] = []
    if any(MARK in g for g in groups):
        for i, g in enumerate(groups):
            mark = g.get(MARK)
            if not isinstance(mark, Mapping) or names[i] is None:
                continue
            parent = str(mark.get("parent"))
            if parent == names[i] or parent not in index:
                continue
            out.append(Relation(i, str(names[i]), index[parent], parent, float(mark["scale"]), group_role(g)))
        return out
    roles = [group_role(g) for g in groups]
    ref_i = next(
        (i for role in (Role.A, Role.EMBEDDING_A) for i, r in enumerate(roles) if r is role and names[i] is not None),
        next((i for i, n in enumerate(names) if n is not None), None),
    )
    if ref_i is None:
        return out
    ref_lr = _lr_value(groups[ref_i])
    if ref_lr is None or ref_lr == 0:
        return out
    for i, g in enumerate(groups):
        lr = _lr_value(g)
        if i == ref_i or names[i] is None or lr is None:
            continue
        out.append(Relation(i, str(names[i]), ref_i, str(names[ref_i]), lr / ref_lr, roles[i]))
    return out


def attach_guard(optimizer: Any, mode: GuardMode | None) -> Guard | None:
    """Attach a guard over ``optimizer``'s current groups (none for ``mode=None``), replacing an older one."""
    if mode is None:
        return None
    target = next((o for o in _chain(optimizer) if hasattr(o, "register_step_pre_hook")), None)
    if target is None:
        raise LoraPlusError(
            f"{type(optimizer).__name__} has no register_step_pre_hook, so the ratio guard cannot check its "
            "rates at each step; pass guard=None to build it without the guard"
        )
    old = guard(target)
    if old is not None:
        old.remove()
    return Guard(target, relations_of(target.param_groups), mode)
