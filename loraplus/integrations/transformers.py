"""LoRA+ for the Hugging Face ``transformers.Trainer``.

:class:`LoraPlusTrainer` is a ``transformers.Trainer`` whose :meth:`~LoraPlusTrainerMixin.create_optimizer`
lets the stock ``Trainer.create_optimizer`` build everything — optimizer class and keyword
arguments, trainable parameters, decay/no-decay groups, the DTensor per-mesh split, the
bitsandbytes 32-bit override for ``nn.Embedding``, SageMaker's wrap — and then runs
:func:`loraplus.apply_to_optimizer` on the result: each group's B factors move to a sibling group at
``loraplus_ratio`` times its learning rate. So it equals the stock Trainer in every other respect
by construction (``tests/test_trainer.py`` compares the two optimizers parameter by parameter).
:class:`LoraPlusTrainerMixin` does the same for any ``Trainer`` subclass (TRL's ``SFTTrainer``, …):
``class MyTrainer(LoraPlusTrainerMixin, SFTTrainer): pass``.

Requires ``transformers`` (``pip install "loraplus[transformers]"``); ``import loraplus``
alone never imports it.

See ``docs/integrations.md`` for a full run with a PEFT model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .._errors import LoraPlusError
from .._groups._apply import apply_to_optimizer
from .._groups._build import DEFAULT_RATIO, role_lrs
from .._groups._checkpoint import check_state_dict
from .._groups._guard import coerce_mode
from .._labels import NoDecaySpec, RuleSpec, match_pattern, normalize_no_decay, normalize_rules
from .._layouts import canonical_name
from .._numbers import check_number
from .._role import Role

try:
    import transformers
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "loraplus.integrations.transformers needs the transformers package: "
        'pip install "loraplus[transformers]"'
    ) from err

__all__ = ["LoraPlusTrainer", "LoraPlusTrainerMixin"]

# Keys some transformers optimizer handlers (GaLore, Apollo, LOMO, layer-wise) return to replace
# the Trainer's parameter groups with their own: LoRA+ cannot set per-group learning rates there.
_OWN_GROUP_KEYS = ("params", "model", "optimizer_dict")


class LoraPlusTrainerMixin:
    """Put before any ``transformers.Trainer`` subclass to train its LoRA adapters with LoRA+.

    ``class LoraPlusSFTTrainer(LoraPlusTrainerMixin, trl.SFTTrainer): pass``. The ``loraplus_*``
    keywords configure LoRA+ and every other argument goes to the Trainer unchanged. The optimizer
    is whatever the Trainer's ``create_optimizer`` builds, then :func:`loraplus.apply_to_optimizer` runs on it:
    per Trainer group (decay, no decay, per mesh), the B factors move to a sibling group
    ``"group<i>.B"`` at ``loraplus_ratio`` times that group's learning rate. Passing
    ``optimizers=(opt, sched)`` bypasses LoRA+, as it bypasses the Trainer's own optimizer.

    Args:
        *args: positional Trainer arguments (``model``, ``args``, …).
        loraplus_ratio: λ, the B/A learning-rate ratio.
        loraplus_lr_embedding: absolute learning rate of both embedding-adapter factors (default:
            their group's, as ``loraplus.LoraPlus`` gives them ``lr``).
        loraplus_role_lr: absolute per-role rates, e.g. ``{loraplus.Role.MAGNITUDE: 1e-4}``.
        loraplus_rules: role rules for adapters loraplus does not recognise by name or type.
        loraplus_no_decay: no-decay rules (globs, regexes, or callables ``(name, param, module)``
            returning True/False to force either way, None to defer) consulted before the
            Trainer's ``get_decay_parameter_names``, which decides every other parameter.
        loraplus_guard: the ratio guard :func:`loraplus.apply_to_optimizer` attaches (``"warn"``, ``"raise"`` or
            ``None``): before every optimizer step it checks that each B sibling still trains at
            ``loraplus_ratio`` × its group's rate, whatever the Trainer's scheduler or a callback did.
        **kwargs: keyword Trainer arguments.

    Resuming: the optimizer gets a torch ``load_state_dict`` pre-hook that runs the checks of
    :func:`loraplus.load_optimizer_state` (group count, names, ``param_names``, state shapes) on the
    state the Trainer reads, so a checkpoint of other groups raises :class:`~loraplus.LoraPlusError`
    instead of loading by position (not under DeepSpeed or FSDP, which restore it their own way).
    Under DeepSpeed, leave ``optimizer`` out of the DeepSpeed config (otherwise DeepSpeed builds a
    single group, so construction raises).

    Raises:
        LoraPlusError: on an invalid LoRA+ option or a DeepSpeed config with an ``optimizer``
            section (at construction) or, from ``create_optimizer``, a model without adapters or an
            ``optim`` that builds its own parameter groups (GaLore, Apollo, LOMO, layer-wise,
            Muon/Dion factories).
    """

    #: Set by the Trainer this mixin is combined with.
    args: Any

    def __init__(
        self,
        *args: Any,
        loraplus_ratio: float = float(DEFAULT_RATIO),
        loraplus_lr_embedding: float | None = None,
        loraplus_role_lr: Mapping[Role | str, float] | None = None,
        loraplus_rules: RuleSpec | None = None,
        loraplus_no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
        loraplus_guard: str | None = "warn",
        **kwargs: Any,
    ) -> None:
        # fail at construction, not after the Trainer has set everything up
        self.loraplus_ratio = check_number("loraplus_ratio", loraplus_ratio)
        self.loraplus_lr_embedding = check_number("loraplus_lr_embedding", loraplus_lr_embedding, allow_none=True)
        role_lrs(1.0, 1.0, None, loraplus_role_lr)
        normalize_rules(loraplus_rules)
        self.loraplus_no_decay = normalize_no_decay(loraplus_no_decay)
        self.loraplus_role_lr = loraplus_role_lr
        self.loraplus_rules = loraplus_rules
        self.loraplus_guard = coerce_mode(loraplus_guard)
        super().__init__(*args, **kwargs)
        ds_config = getattr(getattr(self.args, "hf_deepspeed_config", None), "config", None)
        if getattr(self, "is_deepspeed_enabled", False) and isinstance(ds_config, Mapping) and "optimizer" in ds_config:
            raise LoraPlusError(
                "the DeepSpeed config has an 'optimizer' section, so the Trainer would let DeepSpeed build one "
                "optimizer group over all parameters and LoRA+ would silently do nothing; remove 'optimizer' from "
                "the DeepSpeed config (keep 'scheduler' if you like) so LoraPlusTrainer builds the LoRA+ optimizer"
            )

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's decay names, with ``loraplus_no_decay`` rules consulted first."""
        names = super().get_decay_parameter_names(model)  # type: ignore[misc]
        if not self.loraplus_no_decay:
            return names
        decay = set(names)
        for name, param in model.named_parameters():
            verdict = _no_decay_verdict(self.loraplus_no_decay, name, param, model)
            if verdict is True:
                decay.discard(name)
            elif verdict is False:
                decay.add(name)
        return [n for n, _ in model.named_parameters() if n in decay]

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """``Trainer.create_optimizer``, then :func:`loraplus.apply_to_optimizer` on what it built (once).

        Returns:
            The optimizer (also ``self.optimizer``), its groups those of the Trainer with each
            group's B factors in a ``"<group>.B"`` sibling at ``loraplus_ratio`` × its rate.
        """
        opt_model = self.model if model is None else model  # type: ignore[attr-defined]
        built_here = self.optimizer is None  # type: ignore[attr-defined]
        if built_here:
            self._loraplus_refuse_own_groups(opt_model)
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        if built_here:
            # no scheduler exists yet: the Trainer builds it after the optimizer
            apply_to_optimizer(
                optimizer,
                opt_model,
                self.loraplus_ratio,
                schedulers=[],
                lr_embedding=self.loraplus_lr_embedding,
                role_lr=self.loraplus_role_lr,
                rules=self.loraplus_rules,
                guard=self.loraplus_guard,
            )
            own_way = getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
            if not own_way and hasattr(optimizer, "register_load_state_dict_pre_hook"):
                optimizer.register_load_state_dict_pre_hook(_refuse_other_groups)
        return optimizer

    def _loraplus_refuse_own_groups(self, opt_model: nn.Module) -> None:
        given = getattr(self, "optimizer_cls_and_kwargs", None)  # transformers >= 4.47
        if given is not None:
            optimizer_cls, optimizer_kwargs = given
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # type: ignore[attr-defined]
        own = [k for k in _OWN_GROUP_KEYS if k in optimizer_kwargs]
        if own or _is_factory(optimizer_cls):
            source = "optimizer_cls_and_kwargs" if given is not None else f"optim={str(self.args.optim)!r}"
            raise LoraPlusError(
                f"{source} ({getattr(optimizer_cls, '__name__', optimizer_cls)}) builds its "
                f"own parameter groups{' (' + ', '.join(own) + ')' if own else ''}, so LoRA+ cannot give B its own "
                "learning rate; choose an optimizer that takes param groups, e.g. optim='adamw_torch'"
            )


class LoraPlusTrainer(LoraPlusTrainerMixin, transformers.Trainer):
    """A ``transformers.Trainer`` that trains LoRA adapters with LoRA+ learning rates.

    :class:`LoraPlusTrainerMixin` on the plain Trainer: the stock ``create_optimizer`` builds the
    optimizer, then :func:`loraplus.apply_to_optimizer` gives each group's B factors ``loraplus_ratio`` times its
    rate. The Trainer's schedulers are built afterwards over the final groups, so the ratio holds
    at every step.

    Example:
        >>> import os, tempfile, loraplus, transformers
        >>> _ = os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed, which the Trainer may import
        >>> from loraplus.integrations.transformers import LoraPlusTrainer
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), optim="sgd", learning_rate=0.1,
        ...     report_to="none", use_cpu=True)
        >>> trainer = LoraPlusTrainer(model=loraplus.testing.tiny_lora_model(), args=args, loraplus_ratio=4)
        >>> opt = trainer.create_optimizer()
        >>> type(opt).__name__, [(g["name"], g["lr"]) for g in opt.param_groups]
        ('SGD', [('group0', 0.1), ('group0.B', 0.4), ('group1', 0.1)])
    """


def _no_decay_verdict(specs: Sequence[NoDecaySpec], name: str, param: nn.Parameter, model: nn.Module) -> bool | None:
    """The first ``loraplus_no_decay`` rule's say on ``name``: True no decay, False decay, None no rule."""
    canon = canonical_name(name)
    for item in specs:
        if isinstance(item, (str, re.Pattern)):
            if match_pattern(item, name, canon):
                return True
        else:
            owner = model.get_submodule(name.rpartition(".")[0])
            out = item(name, param, owner)
            if out is not None:
                return bool(out)
    return None


def _refuse_other_groups(optimizer: Any, state_dict: Any) -> None:
    """``load_state_dict`` pre-hook: the Trainer's single read of ``optimizer.pt`` is checked before
    torch loads it by position (names, roles, ``param_names``, state shapes)."""
    check_state_dict(optimizer, state_dict)


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:  # older transformers: no optimizer factories
        return False
    return bool(is_optimizer_factory(optimizer_cls))
