"""Optional integrations with training frameworks, each imported explicitly.

Nothing here is imported by ``import loraplus``, so the core never needs the frameworks:

* :mod:`loraplus.integrations.transformers` — :class:`~loraplus.integrations.transformers.LoraPlusTrainer`,
  a ``transformers.Trainer`` whose optimizer is a LoRA+ optimizer
  (``pip install "loraplus[transformers]"``).

Lightning, Accelerate, DeepSpeed and plain DDP/FSDP need no integration code: pass
:func:`loraplus.LoraPlus` or :func:`loraplus.param_groups` to them (see ``docs/integrations.md``).

Example:
    >>> import transformers
    >>> from loraplus.integrations.transformers import LoraPlusTrainer
    >>> issubclass(LoraPlusTrainer, transformers.Trainer)
    True
"""

from __future__ import annotations

__all__: list[str] = []
