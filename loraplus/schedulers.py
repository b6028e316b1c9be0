"""What loraplus knows about learning-rate schedulers, and how to tell it about your own.

:data:`SCHEDULERS` holds one :class:`SchedulerRecord` per scheduler type: every class of
``torch.optim.lr_scheduler``, torch's ``SWALR`` and transformers' ``GreedyLR``. Each says which
keys the scheduler writes into the param groups and which per-group lists it keeps (and whether a
LoRA+ sibling gets its parent's value times its factor, or a copy), which constructor arguments
give every group one value, and which attribute holds the schedulers it drives.
:func:`loraplus.apply_to_optimizer` reads them to extend attached schedulers; a type that is none of these
and subclasses none of them is refused until you describe it:

    >>> import torch, loraplus
    >>> from loraplus.schedulers import Carry, PerGroup, SchedulerRecord
    >>> class Floors:  # a hand-rolled scheduler with one floor per group
    ...     def __init__(self, optimizer, floor):
    ...         self.optimizer, self.floors = optimizer, [floor] * len(optimizer.param_groups)
    >>> model = loraplus.testing.tiny_lora_model()
    >>> opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    >>> sched = Floors(opt, 1e-4)
    >>> record = SchedulerRecord.for_type(Floors, lists=[PerGroup("floors", Carry.SCALED)])
    >>> _ = loraplus.apply_to_optimizer(opt, model, 8, schedulers=[sched], scheduler_records=[record])
    >>> sched.floors
    [0.0001, 0.0008]
"""

from __future__ import annotations

from ._groups._scheduler_catalog import SCHEDULERS, Bound, Carry, Fix, PerGroup, SchedulerRecord
from ._groups._scheduler_table import scheduler_table

__all__ = ["SCHEDULERS", "Bound", "Carry", "Fix", "PerGroup", "SchedulerRecord", "scheduler_table"]
