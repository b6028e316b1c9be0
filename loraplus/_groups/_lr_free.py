"""Learning-rate-free optimizers: what each does with per-group learning rates, one record per class.

Prodigy and D-Adaptation estimate a step size ``d`` and multiply it by ``lr``. Whether a per-group
``lr`` survives depends on the implementation, so each class has one :class:`LrFreeOptimizer`
record, measured on the installed package (``tests/test_lr_free.py`` re-measures every record):
:func:`loraplus.LoraPlus` and :func:`loraplus.apply_to_optimizer` refuse the classes that would crash or
ignore the ratio and warn where each group estimates its own ``d``; :func:`loraplus.find_lr` reads
the same records. A class is recognised by the object (its defining module, read from
``sys.modules`` only, and ``issubclass``), never by a name string, and nothing is imported to find
out.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .._errors import LoraPlusError
from .._table import render_table

__all__ = ["LR_FREE_OPTIMIZERS", "LrFreeOptimizer", "Option", "PerGroupLr", "check_lr_free", "lr_free_record", "lr_free_table"]


@dataclass(frozen=True)
class _Kind:
    """A behaviour's words and consequence (an enum member's value)."""

    described: str  # in messages, after the optimizer's name
    short: str  # in the compatibility table
    with_loraplus: str  # what LoraPlus and apply_to_optimizer do when the groups' lrs differ
    refused: bool  # LoRA+ cannot work at all: they raise LoraPlusError


class PerGroupLr(Enum):
    """What a learning-rate-free optimizer does with param groups whose ``lr`` differ."""

    #: One step-size estimate d for all groups, times each group's own lr: B's step is exactly ratio × A's.
    SHARED_D = _Kind("multiplies one shared step-size estimate d by each group's lr", "shared d × each group's lr", "works", False)
    #: Each group estimates its own d and multiplies it by its own lr: B's step is ratio · d_B/d_A × A's.
    OWN_D = _Kind(
        "estimates d per group and multiplies it by that group's lr, so B's step is ratio · d_B/d_A times A's",
        "each group's own d × its lr",
        "warns",
        False,
    )
    #: One d times the first group's lr for every group: B moves exactly as A does.
    FIRST_GROUP = _Kind(
        "multiplies its step-size estimate d by the first group's lr for every group, so the ratio has no effect",
        "d × group 0's lr for all",
        "refused",
        True,
    )
    #: ``step()`` raises ``RuntimeError`` when the groups' non-zero lrs differ.
    RAISES = _Kind(
        "raises RuntimeError at the first step() when the groups' non-zero lrs differ", "RuntimeError at step()", "refused", True
    )

    @property
    def refused(self) -> bool:
        """Whether LoRA+ cannot work at all: the optimizer crashes or ignores every group's lr but one."""
        return self.value.refused

    @property
    def described(self) -> str:
        """The behaviour in a clause, for messages."""
        return self.value.described

    @property
    def short(self) -> str:
        """The behaviour in a few words, for the compatibility table."""
        return self.value.short

    @property
    def with_loraplus(self) -> str:
        """What :func:`loraplus.LoraPlus` and :func:`loraplus.apply_to_optimizer` do when the groups' lrs differ."""
        return self.value.with_loraplus


@dataclass(frozen=True)
class Option:
    """A constructor option, as its param groups store it."""

    name: str
    value: object

    def __str__(self) -> str:
        return f"{self.name}={self.value!r}"


@dataclass(frozen=True)
class LrFreeOptimizer:
    """One learning-rate-free optimizer class, as measured.

    Attributes:
        module: the module that defines the class (its ``__module__``).
        qualname: the class's ``__qualname__`` in that module.
        distribution: the package that ships it (as ``pip install`` names it).
        version: the version the behaviour was measured on.
        per_group_lr: what it does with differing per-group lrs, under its defaults.
        instead: what to use for LoRA+ instead (refused classes) or how to use it (the others).
        shared_option: the constructor option under which its d is shared by all groups (then
            :attr:`PerGroupLr.SHARED_D`); read back from its param groups.
    """

    module: str
    qualname: str
    distribution: str
    version: str
    per_group_lr: PerGroupLr
    instead: str
    shared_option: Option | None = None

    @property
    def shown(self) -> str:
        """The import path users write: ``prodigyopt.Prodigy``, ``pytorch_optimizer.DAdaptAdam``."""
        return f"{self.module.partition('.')[0]}.{self.qualname}"

    def cls(self) -> type | None:
        """The class, when its module is already imported (nothing is imported here)."""
        found: Any = sys.modules.get(self.module)
        for part in self.qualname.split("."):
            found = getattr(found, part, None)
        return found if isinstance(found, type) else None

    def behaviour(self, options: Mapping[str, Any]) -> PerGroupLr:
        """Its behaviour under ``options`` (constructor keywords, or a param group that stores them)."""
        shared = self.shared_option
        if shared is not None and shared.name in options and options[shared.name] == shared.value:
            return PerGroupLr.SHARED_D
        return self.per_group_lr


_USE_INSTEAD = (
    "prodigyplus.ProdigyPlusScheduleFree(split_groups=False) (one shared d times each group's lr), "
    "or a fixed-rate optimizer such as torch.optim.AdamW"
)

#: Every learning-rate-free optimizer loraplus knows, measured on the versions named (tests/test_lr_free.py).
LR_FREE_OPTIMIZERS: tuple[LrFreeOptimizer, ...] = (
    LrFreeOptimizer("prodigyopt.prodigy", "Prodigy", "prodigyopt", "1.1.2", PerGroupLr.RAISES, _USE_INSTEAD),
    LrFreeOptimizer(
        "dadaptation.dadapt_adam",
        "DAdaptAdam",
        "dadaptation",
        "3.2",
        PerGroupLr.RAISES,
        "its per-group step multiplier: one lr for every group (loraplus.param_groups(model, lr=..., ratio=1)) and "
        "layer_scale=ratio on the B group, so B's step is exactly ratio × A's; or " + _USE_INSTEAD,
    ),
    *(
        LrFreeOptimizer(f"dadaptation.{module}", name, "dadaptation", "3.2", behaviour, _USE_INSTEAD)
        for module, name, behaviour in (
            ("dadapt_sgd", "DAdaptSGD", PerGroupLr.RAISES),
            ("dadapt_lion", "DAdaptLion", PerGroupLr.RAISES),
            ("dadapt_adagrad", "DAdaptAdaGrad", PerGroupLr.FIRST_GROUP),
            ("dadapt_adan", "DAdaptAdan", PerGroupLr.FIRST_GROUP),
        )
    ),
    LrFreeOptimizer(
        "pytorch_optimizer.optimizer.prodigy", "Prodigy", "pytorch-optimizer", "4.1.0", PerGroupLr.FIRST_GROUP, _USE_INSTEAD
    ),
    *(
        LrFreeOptimizer(
            "pytorch_optimizer.optimizer.dadapt", name, "pytorch-optimizer", "4.1.0", PerGroupLr.FIRST_GROUP, _USE_INSTEAD
        )
        for name in ("DAdaptAdam", "DAdaptSGD", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptLion")
    ),
    LrFreeOptimizer(
        "prodigyplus.prodigy_plus_schedulefree",
        "ProdigyPlusScheduleFree",
        "prodigy-plus-schedule-free",
        "2.0.1",
        PerGroupLr.OWN_D,
        "pass split_groups=False: one d shared by all groups, so B's step is exactly ratio × A's",
        shared_option=Option("split_groups", False),
    ),
)


def lr_free_record(cls: object) -> LrFreeOptimizer | None:
    """The record of ``cls`` (a class, or a subclass of a recorded one), or None."""
    if not isinstance(cls, type):
        return None
    for record in LR_FREE_OPTIMIZERS:
        known = record.cls()
        if known is not None and issubclass(cls, known):
            return record
    return None


def lr_free_table() -> str:
    """The records as the table docs/compatibility.md shows (tests/test_lr_free.py checks the page)."""
    rows = []
    for r in LR_FREE_OPTIMIZERS:
        verdict = r.per_group_lr.with_loraplus
        if r.shared_option is not None:
            verdict += f"; {PerGroupLr.SHARED_D.with_loraplus} with {r.shared_option}"
        rows.append([r.shown, f"{r.distribution} {r.version}", r.per_group_lr.short, verdict])
    return render_table(["optimizer", "measured on", "with different per-group lrs", "LoraPlus"], rows)


def check_lr_free(optimizer: Any, groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a learning-rate-free optimizer that crashes on or ignores the groups' different rates;
    warn where each group estimates its own step size (docs/compatibility.md, from its record).

    ``groups`` are the LoRA+ groups it has (or is about to have); its own ``param_groups[0]`` tells
    the options it was built with. Called from the public entry points (``stacklevel`` 3).
    """
    record = lr_free_record(type(optimizer))
    rates = {g["name"]: float(g["lr"]) for g in groups}
    if record is None or len(set(rates.values())) < 2:  # one rate everywhere (ratio=1): nothing to lose
        return
    behaviour = record.behaviour(optimizer.param_groups[0])
    shown = ", ".join(f"{name} {rate:g}" for name, rate in rates.items())
    what = f"{record.shown} (measured on {record.distribution} {record.version}) {behaviour.described}"
    if behaviour.refused:
        raise LoraPlusError(
            f"{what}; the LoRA+ groups have different learning rates ({shown}), so LoRA+ cannot work with it. "
            f"Use {record.instead} (see docs/compatibility.md)"
        )
    if behaviour is PerGroupLr.OWN_D:
        warnings.warn(
            f"{what}, and d_B/d_A drifts; {record.instead} (see docs/compatibility.md)",
            UserWarning,
            stacklevel=3,
        )
