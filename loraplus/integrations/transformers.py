"""LoRA+ for the Hugging Face ``transformers.Trainer``.

:class:`LoraPlusTrainer` is a ``transformers.Trainer`` whose :meth:`~LoraPlusTrainer.create_optimizer`
builds what the plain ``Trainer.create_optimizer`` builds — the same optimizer class and keyword
arguments, the same trainable parameters, the same per-parameter weight decay and every other
option, the DTensor per-mesh split and the bitsandbytes 32-bit override for ``nn.Embedding`` —
except that the parameters are grouped by LoRA+ role and the B factors get ``loraplus_ratio``
times the A factors' learning rate (``tests/test_trainer.py`` compares the two optimizers
parameter by parameter). The Trainer's schedulers scale every group by the same factor, so the
B/A ratio holds at every step; checkpoints save the named groups, and on resume the saved state
the Trainer reads is checked against the groups before torch loads it by position.

Requires ``transformers`` (``pip install "loraplus[transformers]"``); ``import loraplus``
alone never imports it.

See ``docs/integrations.md`` for a full run with a PEFT model, and :class:`LoraPlusTrainer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .._groups._checkpoint import check_state_dict
from .._errors import LoraPlusError
from .._groups._factory import build_optimizer
from .._groups._build import DEFAULT_RATIO, param_groups, role_lrs
from .._numbers import check_number
from .._labels import NoDecaySpec, RuleSpec, normalize_no_decay, normalize_rules
from .._role import Role

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
        loraplus_ratio: λ, the B/A learning-rate ratio; B factors get ``loraplus_ratio`` times
            the A factors' learning rate (``args.learning_rate`` under ``optim=``).
        loraplus_lr_embedding: learning rate of embedding-adapter factors (default: the A factors').
        loraplus_role_lr: per-role learning-rate overrides, e.g. ``{loraplus.Role.MAGNITUDE: 1e-4}``.
        loraplus_rules: role rules for adapters loraplus does not recognise by name or type.
        loraplus_no_decay: no-decay rules (globs, regexes or callables) consulted before the
            Trainer's ``get_decay_parameter_names``, which decides every other parameter.
        **kwargs: keyword ``transformers.Trainer`` arguments.

    Resuming: the Trainer reads ``optimizer.pt`` once and calls ``optimizer.load_state_dict``;
    the optimizer built here carries a torch ``load_state_dict`` pre-hook (public torch API, no
    Trainer internals) that runs the checks of :func:`loraplus.load_state_dict` — group count,
    names, roles, ``param_names``, state shapes — and raises :class:`~loraplus.LoraPlusError`
    for a checkpoint of other groups instead of letting torch load it by position. DeepSpeed
    and FSDP restore the optimizer their own way; the hook is not installed there.

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
        loraplus_ratio: float = float(DEFAULT_RATIO),
        loraplus_lr_embedding: float | None = None,
        loraplus_role_lr: Mapping[Role | str, float] | None = None,
        loraplus_rules: RuleSpec | None = None,
        loraplus_no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
        **kwargs: Any,
    ) -> None:
        # fail at construction, not after the Trainer has set everything up
        self.loraplus_ratio = check_number("loraplus_ratio", loraplus_ratio)
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
        """Build the LoRA+ optimizer (once): ``Trainer.create_optimizer`` with LoRA+ learning rates.

        Step by step what the plain ``Trainer.create_optimizer`` does, except that the
        parameters are grouped by LoRA+ role and each group has its role's learning rate:

        * the trainable parameters of ``model`` (default ``self.model``), no others;
        * the class and keyword arguments from ``optimizer_cls_and_kwargs`` if given, else
          ``self.get_optimizer_cls_and_kwargs(self.args, model)``, passed to the class unchanged
          (so a ``weight_decay`` among them lands in ``optimizer.defaults`` only, as with the
          plain Trainer); their ``lr`` (or, without one, the class's default ``lr``) is the A
          factors' learning rate;
        * ``args.weight_decay`` on the parameters named by ``self.get_decay_parameter_names(model)``
          and 0.0 on the rest (``loraplus_no_decay`` rules are consulted first);
        * parameters on different DTensor device meshes split into one group per mesh;
        * for a bitsandbytes optimizer with ``optim_bits=8``, every ``nn.Embedding`` weight
          registered with ``GlobalOptimManager`` for 32-bit optimizer state;
        * then ``Trainer.create_optimizer`` itself runs on the built optimizer (SageMaker MP
          wrapping and anything else it does outside building).

        The optimizer also gets a ``load_state_dict`` pre-hook that refuses a saved state of other
        groups (see the class docstring).

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
            decay_names = set(self.get_decay_parameter_names(opt_model))
            given = getattr(self, "optimizer_cls_and_kwargs", None)  # transformers >= 4.47
            if given is not None:
                optimizer_cls, optimizer_kwargs = given
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            own = [k for k in _OWN_GROUP_KEYS if k in optimizer_kwargs]
            if own or _is_factory(optimizer_cls):
                source = "optimizer_cls_and_kwargs" if given is not None else f"optim={str(self.args.optim)!r}"
                raise LoraPlusError(
                    f"{source} ({getattr(optimizer_cls, '__name__', optimizer_cls)}) builds its "
                    f"own parameter groups{' (' + ', '.join(own) + ')' if own else ''}, so LoRA+ cannot give B its own "
                    "learning rate; choose an optimizer that takes param groups, e.g. optim='adamw_torch'"
                )
            kwargs = dict(optimizer_kwargs)
            lr = kwargs.pop("lr") if "lr" in kwargs else _default_lr(optimizer_cls)

            def trainer_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
                return name not in decay_names  # no decay exactly where the plain Trainer gives 0.0

            groups = param_groups(
                opt_model,
                lr=lr,
                ratio=self.loraplus_ratio,
                lr_embedding=self.loraplus_lr_embedding,
                role_lr=self.loraplus_role_lr,
                weight_decay=self.args.weight_decay,
                rules=self.loraplus_rules,
                no_decay=[*normalize_no_decay(self.loraplus_no_decay), trainer_decay],
            )
            groups = _split_by_mesh(groups)
            self.optimizer = build_optimizer(optimizer_cls, groups, lr, kwargs, "the LoRA+ groups")

            # as Trainer.create_optimizer: 8-bit bitsandbytes optimizers keep embeddings in 32-bit state
            if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits", None) == 8:
                import bitsandbytes

                manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
                for module in opt_model.modules():
                    if isinstance(module, nn.Embedding):
                        manager.register_module_override(module, "weight", {"optim_bits": 32})

            # DeepSpeed and FSDP restore the optimizer state their own way (not from this state dict format)
            if not self._loads_its_own_way() and hasattr(self.optimizer, "register_load_state_dict_pre_hook"):
                self.optimizer.register_load_state_dict_pre_hook(_refuse_other_groups)
        # the Trainer skips building when self.optimizer is set, and applies what comes after
        return super().create_optimizer(model)

    def _loads_its_own_way(self) -> bool:
        return bool(getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False))


def _refuse_other_groups(optimizer: Any, state_dict: Any) -> None:
    """``load_state_dict`` pre-hook: the Trainer's single read of ``optimizer.pt`` is checked before
    torch loads it by position (names, roles, ``param_names``, state shapes)."""
    check_state_dict(optimizer, state_dict)


def _default_lr(optimizer_cls: Any) -> float:
    """The ``lr`` the optimizer uses when none is passed: what the plain Trainer's groups get then."""
    try:
        default = inspect.signature(optimizer_cls).parameters["lr"].default
    except (KeyError, TypeError, ValueError):
        default = inspect.Parameter.empty
    if default is inspect.Parameter.empty or isinstance(default, bool) or not isinstance(default, (int, float)):
        raise LoraPlusError(
            f"optimizer_cls_and_kwargs gives no 'lr' and {getattr(optimizer_cls, '__name__', optimizer_cls)} has no "
            "default learning rate to use for the A factors; add 'lr' to the keyword arguments"
        )
    return float(default)


def _split_by_mesh(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As ``Trainer.create_optimizer``: when parameters live on different DTensor device meshes
    (expert parallelism, 2-D meshes), one fused/foreach kernel cannot span them, so each group is
    split by mesh. A split group's parts are named ``<name>.mesh<k>``, k numbering the meshes in
    parameter order, so group names stay unique."""
    params = [p for g in groups for p in g["params"]]
    if not _has_mixed_dtensor(params):
        return groups
    from torch.distributed.tensor import DTensor

    mesh_index: dict[Any, int] = {}
    for p in params:
        mesh_index.setdefault(p.device_mesh if isinstance(p, DTensor) else None, len(mesh_index))
    out: list[dict[str, Any]] = []
    for group in groups:
        parts: dict[Any, dict[str, list[Any]]] = {}
        for name, p in zip(group["param_names"], group["params"]):
            mesh = p.device_mesh if isinstance(p, DTensor) else None
            part = parts.setdefault(mesh, {"params": [], "param_names": []})
            part["params"].append(p)
            part["param_names"].append(name)
        if len(parts) == 1:
            out.append(group)
            continue
        for mesh, part in parts.items():
            out.append({**group, **part, "name": f"{group['name']}.mesh{mesh_index[mesh]}"})
    return out


def _has_mixed_dtensor(params: list[Any]) -> bool:
    try:
        from transformers.trainer_optimizer import has_mixed_dtensor
    except ImportError:  # older transformers: no per-mesh groups
        return False
    return bool(has_mixed_dtensor(params))


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:  # older transformers: no optimizer factories
        return False
    return bool(is_optimizer_factory(optimizer_cls))
