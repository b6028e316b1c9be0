"""Applying: LoRA+ in place on an optimizer somebody else built, and on the schedulers attached to it."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import RuleSpec
from .._role import Role
from ._build import DEFAULT_RATIO
from ._guard import attach_guard, coerce_mode
from ._lr_free import check_lr_free
from ._refine import MARK, SCALED_KEYS, RefinedGroup, refine_groups
from ._scheduler_catalog import Carry, SchedulerRecord, record_for, scaled_group_keys

__all__ = ["apply_to_optimizer"]

OptimizerT = TypeVar("OptimizerT")

_HOW_TO_DECLARE = (
    "describe it with a record: apply_to_optimizer(..., scheduler_records=[loraplus.schedulers.SchedulerRecord.for_type("
    "{cls}, lists=[loraplus.schedulers.PerGroup('<attribute>', loraplus.schedulers.Carry.SCALED), ...])]) "
    "listing every attribute that holds one value per param group (SCALED for learning rates, COPIED for "
    "anything else)"
)


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and the objects it wraps, outermost first: the last one's ``param_groups`` list is the
    real one (accelerate's AcceleratedOptimizer, SageMaker's DistributedOptimizer, … expose it as ``.optimizer``)."""
    chain = [optimizer]
    inner = optimizer
    while True:
        nxt = getattr(inner, "optimizer", None)
        if nxt is None or any(nxt is o for o in chain) or not isinstance(getattr(nxt, "param_groups", None), list):
            break
        chain.append(nxt)
        inner = nxt
    if not isinstance(getattr(inner, "param_groups", None), list) or not hasattr(inner, "state"):
        raise LoraPlusError(
            f"apply_to_optimizer needs a torch optimizer (or a wrapper exposing one as .optimizer), got {type(optimizer).__name__}"
        )
    return chain


def _inner_scheduler(scheduler: Any) -> Any:
    while not hasattr(scheduler, "optimizer") and hasattr(scheduler, "scheduler"):  # accelerate's wrapper
        scheduler = scheduler.scheduler
    return scheduler


def _record(sched: Any, records: Sequence[SchedulerRecord], n_groups: int, where: str) -> SchedulerRecord:
    """The record ``apply_to_optimizer`` follows for ``sched``: its type's, else its nearest catalogued base class's."""
    cls = type(sched)
    found = record_for(cls, records)
    if found is None:
        raise LoraPlusError(
            f"{where} ({cls.__module__}.{cls.__qualname__}) is not a scheduler loraplus knows, and subclasses none "
            "it knows (loraplus.schedulers.SCHEDULERS), so apply_to_optimizer cannot tell which of its values are per param "
            f"group; {_HOW_TO_DECLARE.format(cls=cls.__qualname__)}"
        )
    record, base = found
    if base is not cls:  # handled as its base class: refuse lists the base class does not have
        declared = {p.name for p in record.lists}
        extra = sorted(
            k for k, v in vars(sched).items() if isinstance(v, list) and len(v) == n_groups and k not in declared
        )
        if extra:
            raise LoraPlusError(
                f"{where} ({cls.__qualname__}) is handled as its base class {base.__qualname__}, but it also keeps "
                f"{', '.join(extra)}: a list with one entry per param group that {base.__qualname__} does not have, "
                f"which would no longer match the new groups; {_HOW_TO_DECLARE.format(cls=cls.__qualname__)}"
            )
    return record


def _walk(
    schedulers: Sequence[Any], chain: Sequence[Any], n_groups: int, records: Sequence[SchedulerRecord]
) -> list[tuple[Any, SchedulerRecord]]:
    """Every scheduler given and every one they drive (SequentialLR, ChainedScheduler), each once."""
    out: list[tuple[Any, SchedulerRecord]] = []
    seen: set[int] = set()

    def visit(sched: Any, where: str) -> None:
        if id(sched) in seen:  # listed twice, or listed and also driven by a listed parent
            return
        seen.add(id(sched))
        record = _record(sched, records, n_groups, where)
        owner = getattr(sched, "optimizer", None)
        if owner is None or _optimizer_chain(owner)[-1] is not chain[-1]:
            raise LoraPlusError(
                f"{where} ({type(sched).__name__}) is attached to another optimizer; pass only the "
                "schedulers of the optimizer given to apply_to_optimizer"
            )
        for item in record.lists:
            value = getattr(sched, item.name, None)
            if isinstance(value, list) and len(value) != n_groups:
                raise LoraPlusError(
                    f"{where} ({type(sched).__name__}) has {len(value)} {item.name} for {n_groups} param "
                    "groups: it no longer matches this optimizer; attach schedulers after building the optimizer"
                )
        out.append((sched, record))
        if record.children is not None:
            for j, child in enumerate(getattr(sched, record.children, None) or ()):
                visit(_inner_scheduler(child), f"{where}.{record.children}[{j}]")

    for k, given in enumerate(schedulers):
        visit(_inner_scheduler(given), f"schedulers[{k}]")
    return out


def _attached(chain: Sequence[Any], records: Sequence[SchedulerRecord]) -> list[Any]:
    """The live schedulers (of a known type) whose ``optimizer`` is one of ``chain``.

    Nothing in the param groups shows every scheduler (ReduceLROnPlateau writes no key, and keys
    survive a scheduler that is gone), but each holds its optimizer: the garbage collector's
    referrers of the optimizer are exactly the objects that hold it (an instance, or its
    ``__dict__`` once Python has made one), one pass over the tracked objects.
    """
    ids = {id(o) for o in chain}

    def holds(obj: Any) -> bool:
        return record_for(type(obj), records) is not None and id(getattr(obj, "optimizer", None)) in ids

    found: dict[int, Any] = {}
    dicts = []
    for ref in gc.get_referrers(*chain):
        if type(ref) is dict:
            if id(dict.get(ref, "optimizer")) in ids:
                dicts.append(ref)
        elif holds(ref):
            found[id(ref)] = ref
    if dicts:
        for owner in gc.get_referrers(*dicts):
            if type(owner) is not dict and holds(owner) and any(getattr(owner, "__dict__", None) is d for d in dicts):
                found[id(owner)] = owner
    return list(found.values())


def _not_given(chain: Sequence[Any], covered: set[int], records: Sequence[SchedulerRecord]) -> list[Any]:
    if not any(id(s) not in covered for s in _attached(chain, records)):
        return []
    gc.collect()  # perhaps garbage that only a reference cycle keeps alive (nothing here holds it any more)
    return [s for s in _attached(chain, records) if id(s) not in covered]


def _extend(sched: Any, record: SchedulerRecord, out: Sequence[RefinedGroup]) -> None:
    """Give each per-group list of ``sched`` one entry per output group: its parent's, scaled where it is a rate."""
    for item in record.lists:
        value = getattr(sched, item.name, None)
        if not isinstance(value, list):
            continue  # CyclicLR keeps no momentum lists without cycle_momentum
        if item.carry is Carry.SCALED:
            setattr(sched, item.name, [_times(value[r.parent], r.scale) for r in out])
        else:
            setattr(sched, item.name, [value[r.parent] for r in out])


def _times(value: Any, factor: float) -> Any:
    if factor == 1.0:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone() * factor
    return value * factor


def apply_to_optimizer(
    optimizer: OptimizerT,
    model: nn.Module,
    ratio: float = DEFAULT_RATIO,
    *,
    schedulers: Iterable[Any] | None = None,
    scheduler_records: Iterable[SchedulerRecord] = (),
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
    rules: RuleSpec | None = None,
    guard: str | None = "warn",
) -> OptimizerT:
    """Turn an optimizer you already built into a LoRA+ one, in place, before its first step.

    Its param groups are replaced by :func:`loraplus.apply_to_groups` of them: each group's B factors move
    to a sibling ``"<name>.B"`` right after it at ``ratio ×`` its learning-rate keys, and every
    other option stays. Works on any ``torch.optim.Optimizer`` and on wrappers that expose it as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``). Call it before the first step; state that
    already exists (Adagrad's initial sums, a loaded checkpoint) is keyed by parameter in torch, so it
    stays with each parameter in its new group, unchanged.

    Schedulers keep their own per-group values, so pass every scheduler already attached as
    ``schedulers=[...]``. What each scheduler type keeps is one record of
    :data:`loraplus.schedulers.SCHEDULERS` (a type not listed there is handled as the listed type
    it subclasses): group keys holding rates (``initial_lr``, OneCycleLR's ``max_lr``/``min_lr``,
    SWALR's ``swa_lr``) are scaled with ``lr``; of its per-group lists, rates (``base_lrs``,
    ``_last_lr``, ``max_lrs``, ``min_lrs``, …) get each sibling's entry as its parent's times the
    factor, and functions and momenta (``lr_lambdas``, CyclicLR's momenta) the parent's entry.
    The schedulers a SequentialLR or ChainedScheduler drives are followed, and each scheduler is
    extended once however often it is listed or reached.

    An attached scheduler that is not passed would no longer match the groups (ReduceLROnPlateau
    fails at its first reduction, possibly hours later), so apply_to_optimizer refuses it: it looks for live
    schedulers of a known type that hold this optimizer (through the garbage collector's
    referrers of the optimizer: one pass over Python's tracked objects, measured at ~30 ms of CPU
    with torch and transformers loaded and ~70 ms with 3.3 million objects, plus a collection when
    one is found, to drop unreachable ones). It also refuses when
    ``schedulers`` is not given and the groups carry ``initial_lr`` (a scheduler was attached
    once); pass ``schedulers=[]`` if none is left.

    Args:
        optimizer: the built optimizer (or a wrapper exposing ``.optimizer``).
        model: the model whose LoRA B factors the optimizer holds.
        ratio: λ: B factors get ``ratio`` times their group's rate.
        schedulers: the schedulers attached to ``optimizer`` (see above).
        scheduler_records: records (:class:`loraplus.schedulers.SchedulerRecord`) for scheduler types
            loraplus does not know; they win over the catalogue's.
        lr_embedding: as in :func:`loraplus.apply_to_groups`.
        role_lr: as in :func:`loraplus.apply_to_groups`.
        rules: as in :func:`loraplus.apply_to_groups`.
        guard: the ratio guard (as in :func:`loraplus.LoraPlus`): before every step it checks that
            each sibling still trains at its factor times its parent's rate; ``"warn"`` (default)
            warns once, ``"raise"`` raises before the step, ``None`` attaches nothing.

    Returns:
        ``optimizer`` itself (its groups now carry ``name``, the ``loraplus`` mark, ``param_names``
        where known, and ``role`` on the siblings), so ``print(loraplus.explain(apply_to_optimizer(opt, model)))``
        works.

    Raises:
        LoraPlusError: on a second call (the groups carry the ``loraplus`` mark), when the optimizer
            has state not keyed by its parameters, for a parameter in two groups, when no group holds a B factor of
            ``model``, when a scheduler is attached but not passed (or groups carry ``initial_lr`` and
            ``schedulers`` is not given), when a scheduler belongs to another optimizer, no longer matches its
            groups, or is of a type neither catalogued nor described in ``scheduler_records``.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        >>> sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        >>> opt = loraplus.apply_to_optimizer(opt, model, ratio=8, schedulers=[sched])
        >>> [(g["name"], g["lr"]) for g in opt.param_groups], sched.base_lrs
        ([('group0', 0.0005), ('group0.B', 0.004)], [0.001, 0.008])
    """
    chain = _optimizer_chain(optimizer)
    inner = chain[-1]
    mode = coerce_mode(guard)
    groups = inner.param_groups
    marked = [i for i, g in enumerate(groups) if MARK in g]
    if marked:
        raise LoraPlusError(
            "loraplus.apply_to_optimizer was already called on this optimizer (its groups carry the "
            f"{MARK!r} key); a second call would multiply B's rate by the ratio again. Apply LoRA+ once, "
            "right after building the optimizer"
        )
    # torch.optim (and bitsandbytes, torchao, …) key state by the parameter object, so a parameter's state
    # (Adagrad's initial sums, momenta after a step) moves with it to its new group untouched; a state keyed
    # by anything else cannot be moved faithfully
    held = {id(p) for g in groups for p in g["params"]}
    strange = [k for k in getattr(inner, "state", {}) if id(k) not in held]
    if strange:
        raise LoraPlusError(
            f"the optimizer's state has {len(strange)} entr(y/ies) not keyed by one of its parameters "
            f"(e.g. {type(strange[0]).__name__}), so apply_to_optimizer cannot move it with the parameters; apply LoRA+ "
            "before the first step"
        )
    records = list(scheduler_records)
    bad = [r for r in records if not isinstance(r, SchedulerRecord)]
    if bad:
        raise LoraPlusError(
            f"scheduler_records takes loraplus.schedulers.SchedulerRecord objects, got {type(bad[0]).__name__}"
        )
    sched_list = None if schedulers is None else list(schedulers)
    found = _walk(sched_list or [], chain, len(groups), records)
    missing = _not_given(chain, {id(s) for s, _ in found}, records)
    if missing:
        names = ", ".join(type(s).__name__ for s in missing)
        raise LoraPlusError(
            f"{len(missing)} scheduler(s) attached to this optimizer are not in schedulers= ({names}); their "
            "per-group lists would no longer match the new groups (ReduceLROnPlateau fails at its first "
            "reduction). Pass every scheduler attached to the optimizer: apply_to_optimizer(..., schedulers=[scheduler, ...])"
        )
    if sched_list is None and any("initial_lr" in g for g in groups):
        raise LoraPlusError(
            "the param groups carry 'initial_lr', so a scheduler is attached to this optimizer; its per-group "
            "lists would no longer match the new groups: pass it as apply_to_optimizer(..., schedulers=[scheduler]) "
            "(or schedulers=[] if none is in use)"
        )
    refined = refine_groups(
        groups,
        model,
        ratio,
        lr_embedding=lr_embedding,
        role_lr=role_lr,
        rules=rules,
        what="apply_to_optimizer",
        scaled_keys=(*SCALED_KEYS, *(k for k in scaled_group_keys(records) if k not in SCALED_KEYS)),
    )
    check_lr_free(inner, refined.groups)  # before anything changes
    inner.param_groups[:] = refined.groups  # the same list object: wrappers that alias it stay right
    for sched, record in found:
        _extend(sched, record, refined.out)
    attach_guard(inner, mode)
    return optimizer
