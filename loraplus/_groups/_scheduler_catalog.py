"""What loraplus knows about learning-rate schedulers: one :class:`SchedulerRecord` per scheduler type.

A scheduler keeps per-group values in two places: keys it writes into the optimizer's param groups
(``initial_lr``, OneCycleLR's ``max_lr``, SWALR's ``swa_lr``, …) and lists on itself with one entry
per group (``base_lrs``, ``_last_lr``, ReduceLROnPlateau's ``min_lrs``, …). When LoRA+ splits a
group in two (:func:`loraplus.apply_to_optimizer`), each of those values must be carried to the new sibling:
a learning rate times the sibling's factor, anything else (a function, a momentum) as it is.
Some constructor arguments are scalars that give every group the same value (OneCycleLR's
``max_lr``), which pulls B back to A's rate unless they are given per group.

The records say all of that; :func:`loraplus.apply_to_groups` (which group keys are scaled),
:func:`loraplus.apply_to_optimizer` (which lists are extended, which children are followed) and
:func:`loraplus.scheduler_bounds` read them, and docs/compatibility.md's scheduler table is rendered
from them. Types are named as ``(module, class name)`` and looked up in ``sys.modules`` only, so
no library is imported to recognise its schedulers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "SCHEDULERS",
    "Bound",
    "Carry",
    "Fix",
    "PerGroup",
    "SchedulerRecord",
    "record_for",
    "scaled_group_keys",
    "start_keys",
]


class Carry(str, Enum):
    """How a per-group value reaches a LoRA+ sibling group."""

    #: a learning rate: the sibling's value is its parent's times the sibling's factor (λ for B)
    SCALED = "scaled"
    #: anything else (a function, a momentum): the sibling gets its parent's value unchanged
    COPIED = "copied"


class Fix(str, Enum):
    """What to do about a scalar constructor argument that gives every group the same value."""

    #: the argument accepts a list, one value per group: pass ``loraplus.scheduler_bounds(opt, value)``
    PER_GROUP = "per_group"
    #: no list is accepted: use a ``LambdaLR`` whose factor ends at ``value / lr`` (each group's own floor)
    LAMBDA_FLOOR = "lambda_floor"
    #: set the argument to ``harmless`` (it is not a rate, so nothing per group replaces it)
    HARMLESS = "harmless"


@dataclass(frozen=True)
class PerGroup:
    """One per-group value a scheduler keeps: a param-group key or a list attribute of the scheduler."""

    name: str
    carry: Carry
    #: a group key holding the rate the schedule started from (what :func:`loraplus.scheduler_bounds` reads)
    start: bool = False


@dataclass(frozen=True)
class Bound:
    """A constructor argument that is the same for every group unless given per group.

    Attributes:
        argument: the constructor argument (``max_lr``, ``eta_min``, …).
        fix: what keeps the ratio when the scheduler is built on a LoRA+ optimizer.
        harmless: a scalar value at which the argument changes no group's ratio (``0`` for a
            floor); ``None`` when every scalar collapses the ratio.
        stored_as: the per-group key or list the value ends up in, which :func:`loraplus.apply_to_optimizer`
            scales (so a scheduler built *before* ``apply_to_optimizer`` keeps the ratio even with a scalar);
            ``None`` when the scheduler keeps one scalar, which ``apply_to_optimizer`` cannot split.
    """

    argument: str
    fix: Fix
    harmless: float | None = None
    stored_as: str | None = None


@dataclass(frozen=True)
class SchedulerRecord:
    """Everything loraplus knows about one scheduler type.

    Pass your own to :func:`loraplus.apply_to_optimizer` (``scheduler_records=[...]``) for a scheduler type that
    subclasses none of the catalogued ones, or one that keeps per-group lists its catalogued base
    class does not have.

    Attributes:
        module: the module that defines the class (``type(s).__module__``).
        name: the class's ``__qualname__``.
        group_keys: keys it writes into every param group (each also read back by the scheduler).
        lists: its own attributes that are lists with one entry per param group.
        bounds: constructor arguments that give every group one value unless given per group.
        children: the attribute holding the schedulers it drives (SequentialLR, ChainedScheduler).

    Example:
        >>> from loraplus.schedulers import Carry, PerGroup, SchedulerRecord
        >>> class Floors:  # a scheduler of your own, not a torch LRScheduler
        ...     pass
        >>> rec = SchedulerRecord.for_type(Floors, lists=(PerGroup("floors", Carry.SCALED),))
        >>> (rec.name, rec.leaves_mark)
        ('Floors', False)
    """

    module: str
    name: str
    group_keys: tuple[PerGroup, ...] = ()
    lists: tuple[PerGroup, ...] = ()
    bounds: tuple[Bound, ...] = ()
    children: str | None = None

    @classmethod
    def for_type(
        cls,
        scheduler_type: type,
        *,
        group_keys: Iterable[PerGroup] = (),
        lists: Iterable[PerGroup] = (),
        bounds: Iterable[Bound] = (),
        children: str | None = None,
    ) -> SchedulerRecord:
        """A record for ``scheduler_type``, named by its module and qualified name."""
        return cls(
            scheduler_type.__module__,
            scheduler_type.__qualname__,
            tuple(group_keys),
            tuple(lists),
            tuple(bounds),
            children,
        )

    @property
    def key(self) -> tuple[str, str]:
        """``(module, name)``: how the record is matched against a class."""
        return (self.module, self.name)

    @property
    def library(self) -> str:
        """The top-level package of ``module`` (``torch``, ``transformers``)."""
        return self.module.split(".")[0]

    @property
    def leaves_mark(self) -> bool:
        """Whether building it leaves keys in the param groups (a composite: those of the schedulers it drives)."""
        return bool(self.group_keys) or self.children is not None


# ------------------------------------------------------------------------------------------------ the records

#: The module of torch's schedulers (the table names them without it).
TORCH_SCHEDULERS = "torch.optim.lr_scheduler"
_TORCH = TORCH_SCHEDULERS
_S, _C = Carry.SCALED, Carry.COPIED

#: every torch LRScheduler writes the lr it starts from into each group and keeps two rate lists
_INITIAL_LR = PerGroup("initial_lr", _S, start=True)
_LR_LISTS = (PerGroup("base_lrs", _S), PerGroup("_last_lr", _S))
_LAMBDAS = PerGroup("lr_lambdas", _C)
_MOMENTUM_KEYS = (PerGroup("base_momentum", _C), PerGroup("max_momentum", _C))
_ETA_MIN = Bound("eta_min", Fix.LAMBDA_FLOOR, harmless=0.0)


def _lr_scheduler(name: str, *extra_lists: PerGroup, bounds: tuple[Bound, ...] = ()) -> SchedulerRecord:
    """A torch scheduler that multiplies or sets each group's lr from its own ``base_lrs``."""
    return SchedulerRecord(_TORCH, name, (_INITIAL_LR,), (*_LR_LISTS, *extra_lists), bounds)


#: The catalogue: every scheduler class of ``torch.optim.lr_scheduler``, torch's SWALR, and the
#: schedulers ``transformers.get_scheduler`` builds that are not torch's (every other
#: ``SchedulerType`` gives a LambdaLR or a ReduceLROnPlateau). Order: as the docs table shows them.
SCHEDULERS: tuple[SchedulerRecord, ...] = (
    _lr_scheduler("LRScheduler"),
    _lr_scheduler("LambdaLR", _LAMBDAS),
    _lr_scheduler("MultiplicativeLR", _LAMBDAS),
    _lr_scheduler("StepLR"),
    _lr_scheduler("MultiStepLR"),
    _lr_scheduler("ConstantLR"),
    _lr_scheduler("LinearLR"),
    _lr_scheduler("ExponentialLR"),
    _lr_scheduler("PolynomialLR"),
    _lr_scheduler("CosineAnnealingLR", bounds=(_ETA_MIN,)),
    _lr_scheduler("CosineAnnealingWarmRestarts", bounds=(_ETA_MIN,)),
    SchedulerRecord(
        _TORCH,
        "CyclicLR",
        (_INITIAL_LR, *_MOMENTUM_KEYS),
        (*_LR_LISTS, PerGroup("max_lrs", _S), PerGroup("base_momentums", _C), PerGroup("max_momentums", _C)),
        (Bound("base_lr", Fix.PER_GROUP, stored_as="base_lrs"), Bound("max_lr", Fix.PER_GROUP, stored_as="max_lrs")),
    ),
    SchedulerRecord(
        _TORCH,
        "OneCycleLR",
        (_INITIAL_LR, PerGroup("max_lr", _S), PerGroup("min_lr", _S), *_MOMENTUM_KEYS),
        _LR_LISTS,
        (Bound("max_lr", Fix.PER_GROUP, stored_as="max_lr"),),
    ),
    SchedulerRecord(
        _TORCH,
        "ReduceLROnPlateau",
        (),
        (PerGroup("_last_lr", _S), PerGroup("min_lrs", _S)),
        (
            Bound("min_lr", Fix.PER_GROUP, harmless=0.0, stored_as="min_lrs"),
            Bound("eps", Fix.HARMLESS, harmless=0.0),  # a reduction smaller than eps is skipped: A's stops first
        ),
    ),
    # the composites write no key themselves (the schedulers they drive do) and keep only _last_lr
    SchedulerRecord(_TORCH, "SequentialLR", (), (PerGroup("_last_lr", _S),), children="_schedulers"),
    SchedulerRecord(_TORCH, "ChainedScheduler", (), (PerGroup("_last_lr", _S),), children="_schedulers"),
    SchedulerRecord(
        "torch.optim.swa_utils",
        "SWALR",
        (_INITIAL_LR, PerGroup("swa_lr", _S)),
        _LR_LISTS,
        (Bound("swa_lr", Fix.PER_GROUP, stored_as="swa_lr"),),
    ),
    SchedulerRecord(
        "transformers.optimization",
        "GreedyLR",
        (),
        (PerGroup("_init_lrs", _S), PerGroup("_last_lr", _S), PerGroup("min_lrs", _S), PerGroup("max_lrs", _S)),
        (Bound("min_lr", Fix.PER_GROUP, stored_as="min_lrs"), Bound("max_lr", Fix.PER_GROUP, stored_as="max_lrs")),
    ),
)


def record_for(
    scheduler_type: type, records: Sequence[SchedulerRecord] = ()
) -> tuple[SchedulerRecord, type] | None:
    """The record of ``scheduler_type`` or of the nearest class it subclasses, and that class.

    ``records`` (a user's own) are looked at before the catalogue, class by class along the MRO,
    so a user's record for a subclass wins over the catalogue's record for its base. ``None``:
    neither the type nor any of its bases is known.
    """
    known = {r.key: r for r in SCHEDULERS}
    known.update({r.key: r for r in records})
    for cls in scheduler_type.__mro__:
        found = known.get((cls.__module__, cls.__qualname__))
        if found is not None:
            return found, cls
    return None


def scaled_group_keys(records: Sequence[SchedulerRecord] = ()) -> tuple[str, ...]:
    """Every group key a catalogued (or given) scheduler writes that holds a learning rate, in order."""
    out: dict[str, None] = {}
    for rec in (*SCHEDULERS, *records):
        out.update((k.name, None) for k in rec.group_keys if k.carry is Carry.SCALED)
    return tuple(out)


def start_keys() -> tuple[str, ...]:
    """The group keys holding the rate a schedule started from (``initial_lr``), in catalogue order."""
    out: dict[str, None] = {}
    for rec in SCHEDULERS:
        out.update((k.name, None) for k in rec.group_keys if k.start)
    return tuple(out)
