"""LoRA+ for the Hugging Face ``transformers.Trainer``.

:class:`LoraPlusTrainer` is a ``transformers.Trainer`` whose :meth:`~LoraPlusTrainer.create_optimizer`
builds a LoRA+ optimizer: the optimizer class and its keyword arguments come from the
``TrainingArguments`` exactly as the plain Trainer picks them (``optim=``, ``optim_args``,
``adam_beta1/2``, ``adam_epsilon``, or the ``optimizer_cls_and_kwargs=`` init argument), the
learning rate of the A factors is ``args.learning_rate`` and ``args.weight_decay`` is honoured
on every decaying group (biases, norm weights and DoRA magnitudes get 0). The Trainer's
schedulers scale every group by the same factor, so the B/A ratio holds at every step, and
checkpoints save and restore the named groups; on resume the saved optimizer state is checked
against the groups (:func:`loraplus.load_state_dict`) instead of loaded by position alone.

Requires ``transformers`` (``pip install "loraplus[transformers]"``); ``import loraplus``
alone never imports it.

See ``docs/integrations.md`` for a full run with a PEFT model, and :class:`LoraPlusTrainer`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checkpoint import load_state_dict
from .._errors import LoraPlusError
from .._factory import LoraPlus
from .._groups import DEFAULT_RATIO, check_number, role_lrs
from .._roles import normalize_no_decay, normalize_rules
from .._roles import NoDecaySpec, Role, RuleSpec

try:
    import transformers
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "loraplus.integrations.transformers needs the transformers package: "
        'pip install "loraplus[transformers]"'
    ) from err

__all__ = ["LoraPlusTrainer"]

# Keys some transformers optimizer handlers (GaLore, Apollo, LOMO, layer-wise) return to replace
# the Trainer's parameter groups with their own: LoRA+ cannot set per-group learning rates there.
_OWN_GROUP_KEYS = ("params", "model", "optimizer_dict")


class LoraPlusTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains LoRA adapters with LoRA+ learning rates.

    Every ``Trainer`` argument is accepted unchanged; the ``loraplus_*`` keywords configure
    LoRA+ (see :func:`loraplus.LoraPlus`). Passing ``optimizers=(opt, sched)`` bypasses
    LoRA+, as it bypasses the Trainer's own optimizer.

    Args:
        *args: positional ``transformers.Trainer`` arguments (``model``, ``args``, …).
        loraplus_ratio: λ, the B/A learning-rate ratio; B factors get
            ``loraplus_ratio * args.learning_rate``.
        loraplus_lr_embedding: learning rate of embedding-adapter factors (default: ``args.learning_rate``).
        loraplus_role_lr: per-role learning-rate overrides, e.g. ``{loraplus.Role.MAGNITUDE: 1e-4}``.
        loraplus_rules: role rules for adapters loraplus does not recognise by name or type.
        loraplus_no_decay: extra no-decay rules (globs, regexes or callables).
        **kwargs: keyword ``transformers.Trainer`` arguments.

    Under DeepSpeed, leave ``optimizer`` out of the DeepSpeed config: the Trainer then hands the
    LoRA+ optimizer to DeepSpeed (otherwise DeepSpeed builds a single group, so this raises).

    Raises:
        LoraPlusError: on an invalid LoRA+ option or a DeepSpeed config with an ``optimizer``
            section (at construction) or, from
            :meth:`create_optimizer`, a model without adapters or an ``optim`` that builds its
            own parameter groups (GaLore, Apollo, LOMO, layer-wise, Muon/Dion factories).

    Example:
        >>> import os, tempfile, loraplus, transformers
        >>> _ = os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed, which the Trainer may import
        >>> from loraplus.integrations.transformers import LoraPlusTrainer
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), optim="sgd", learning_rate=0.1,
        ...     report_to="none", use_cpu=True)
        >>> trainer = LoraPlusTrainer(model=loraplus.testing.tiny_lora_model(), args=args, loraplus_ratio=4)
        >>> opt = trainer.create_optimizer()
        >>> type(opt).__name__, {g["role"]: g["lr"] for g in opt.param_groups}["B"]
        ('SGD', 0.4)
    """

    def __init__(
        self,
        *args: Any,
        loraplus_ratio: float = DEFAULT_RATIO,
        loraplus_lr_embedding: float | None = None,
        loraplus_role_lr: Mapping[Role | str, float] | None = None,
        loraplus_rules: RuleSpec | None = None,
        loraplus_no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
        **kwargs: Any,
    ) -> None:
        # fail at construction, not after the Trainer has set everything up
        check_number("loraplus_ratio", loraplus_ratio)
        self.loraplus_ratio = loraplus_ratio  # as given: the default marks "not chosen" (family defaults apply)
        self.loraplus_lr_embedding = check_number("loraplus_lr_embedding", loraplus_lr_embedding, allow_none=True)
        role_lrs(1.0, 1.0, None, loraplus_role_lr)
        normalize_rules(loraplus_rules)
        normalize_no_decay(loraplus_no_decay)
        self.loraplus_role_lr = loraplus_role_lr
        self.loraplus_rules = loraplus_rules
        self.loraplus_no_decay = loraplus_no_decay
        super().__init__(*args, **kwargs)
        ds_config = getattr(getattr(self.args, "hf_deepspeed_config", None), "config", None)
        if getattr(self, "is_deepspeed_enabled", False) and isinstance(ds_config, Mapping) and "optimizer" in ds_config:
            raise LoraPlusError(
                "the DeepSpeed config has an 'optimizer' section, so the Trainer would let DeepSpeed build one "
                "optimizer group over all parameters and LoRA+ would silently do nothing; remove 'optimizer' from "
                "the DeepSpeed config (keep 'scheduler' if you like) so LoraPlusTrainer builds the LoRA+ optimizer"
            )

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """Build the LoRA+ optimizer (once) from the training arguments and the LoRA+ settings.

        The class and keyword arguments are those the plain Trainer would use
        (``optimizer_cls_and_kwargs`` if given, else ``get_optimizer_cls_and_kwargs(args)``);
        their ``lr`` becomes the A factors' learning rate and ``args.weight_decay`` the decay of
        every decaying group.

        Args:
            model: the model to optimise (default: ``self.model``).

        Returns:
            The optimizer (also stored as ``self.optimizer``), with named LoRA+ groups.

        Raises:
            LoraPlusError: for a model without adapters, invalid LoRA+ settings, or an ``optim``
                that replaces the parameter groups.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            given = getattr(self, "optimizer_cls_and_kwargs", None)  # transformers >= 4.47
            if given is not None:
                optimizer_cls, optimizer_kwargs = given
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = dict(optimizer_kwargs)
            own = [k for k in _OWN_GROUP_KEYS if k in kwargs]
            if own or _is_factory(optimizer_cls):
                source = "optimizer_cls_and_kwargs" if given is not None else f"optim={str(self.args.optim)!r}"
                raise LoraPlusError(
                    f"{source} ({getattr(optimizer_cls, '__name__', optimizer_cls)}) builds its "
                    f"own parameter groups{' (' + ', '.join(own) + ')' if own else ''}, so LoRA+ cannot give B its own "
                    "learning rate; choose an optimizer that takes param groups, e.g. optim='adamw_torch'"
                )
            lr = kwargs.pop("lr", self.args.learning_rate)
            kwargs.pop("weight_decay", None)  # args.weight_decay goes on the decaying groups
            self.optimizer = LoraPlus(
                optimizer_cls,
                opt_model,
                self.loraplus_ratio,
                lr=lr,
                lr_embedding=self.loraplus_lr_embedding,
                role_lr=self.loraplus_role_lr,
                weight_decay=self.args.weight_decay,
                rules=self.loraplus_rules,
                no_decay=self.loraplus_no_decay,
                **kwargs,
            )
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """On resume, check the saved optimizer state against the LoRA+ groups, then load as usual.

        torch matches saved state to parameters by position only; :func:`loraplus.load_state_dict`
        first compares group names, roles, ``param_names`` and state shapes, and raises
        :class:`~loraplus.LoraPlusError` when the checkpoint belongs to other groups. DeepSpeed
        and FSDP checkpoints, which the Trainer loads its own way, are left to it.
        """
        if checkpoint is not None and self.optimizer is not None and not self._loads_its_own_way():
            path = os.path.join(checkpoint, _OPTIMIZER_FILE)
            if os.path.isfile(path):
                load_state_dict(self.optimizer, torch.load(path, map_location="cpu", weights_only=True))
        super()._load_optimizer_and_scheduler(checkpoint)

    def _loads_its_own_way(self) -> bool:
        return bool(getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))


_OPTIMIZER_FILE = getattr(getattr(transformers, "trainer", None), "OPTIMIZER_NAME", "optimizer.pt")


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:  # older transformers: no optimizer factories
        return False
    return bool(is_optimizer_factory(optimizer_cls))
