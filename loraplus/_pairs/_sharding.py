"""Whether a model's factors are whole tensors on this rank: the check :func:`loraplus.precondition` runs.

The sharding wrappers are recognised by type (``isinstance``), never by class name: FSDP1's
``FullyShardedDataParallel`` (and its subclasses), its flat parameters (``FlatParameter``, whose
instances are plain ``Parameter`` objects that ``isinstance`` recognises), and FSDP2 / tensor
parallel ``DTensor``. The types are imported on first use and the import is guarded: torch built
without ``torch.distributed`` has none of them, and then nothing can be sharded by them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["sharding_error"]


class _ShardTypes(NamedTuple):
    """The torch types that mean "not a whole tensor here"; ``None`` where this build lacks one."""

    fsdp: type | None
    flat_parameter: type | None
    dtensor: type | None


@functools.cache
def _shard_types() -> _ShardTypes:
    if not torch.distributed.is_available():  # pragma: no cover - torch built without distributed
        return _ShardTypes(None, None, None)
    fsdp: type | None
    flat: type | None
    dtensor: type | None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp
    except ImportError:  # pragma: no cover - a build without FSDP1
        fsdp = None
    try:  # a private module: FSDP1 exports no public name for it
        from torch.distributed.fsdp._flat_param import FlatParameter as flat
    except ImportError:  # pragma: no cover - moved or removed in some torch version
        flat = None
    try:
        from torch.distributed.tensor import DTensor as dtensor
    except ImportError:  # pragma: no cover - a build without DTensor
        dtensor = None
    return _ShardTypes(fsdp, flat, dtensor)


def sharding_error(model: nn.Module, params: Sequence[nn.Parameter]) -> str | None:
    """Why the factors are not whole tensors on this rank (FSDP, DTensor, ZeRO-3), or None."""
    types = _shard_types()
    if types.fsdp is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, types.fsdp):
                return (f"{name or 'the model'} is wrapped in FSDP (FullyShardedDataParallel): "
                        "its factors are flat shards")
    for p in params:
        if types.dtensor is not None and isinstance(p, types.dtensor):
            return f"a factor is a DTensor placed as {getattr(p, 'placements', '?')} (FSDP2 / tensor parallel)"
        if hasattr(p, "ds_id"):  # DeepSpeed's own marker: deepspeed is not imported for this
            return "the factors are DeepSpeed ZeRO-3 partitions"
        if types.flat_parameter is not None and isinstance(p, types.flat_parameter):
            return "the factors are FSDP flat parameters"
    return None
