"""Test helpers for code that trains with LoRA+: model generators and a group checker.

* :func:`tiny_lora_model` — a small deterministic PEFT-style LoRA model (no dependencies).
* :func:`lora_models` — a hypothesis strategy of random LoRA-adapted models in every naming
  convention loraplus supports, with random wrappers, frozen and tied parameters, heads and
  norms. Each example is a :class:`GeneratedModel` carrying the roles it *should* get.
* :func:`assert_loraplus_groups` — checks an optimizer's groups against a model.

``hypothesis`` is needed only for :func:`lora_models` (``pip install loraplus[testing]``).

Example:
    >>> import torch, loraplus
    >>> from loraplus.testing import assert_loraplus_groups, tiny_lora_model
    >>> model = tiny_lora_model()
    >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3)
    >>> assert_loraplus_groups(opt, model, ratio=4, lr=1e-3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._errors import LoraPlusError
from ._roles import Role, RuleSpec, label_parameters

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "CONVENTION_NAMES",
    "GeneratedModel",
    "WRAPPER_NAMES",
    "assert_loraplus_groups",
    "lora_models",
    "TinyLoraModel",
    "build_model",
    "tiny_lora_model",
]

_Reg = Callable[[nn.Parameter, Role], None]


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# --------------------------------------------------------------------------- adapted layers, one per convention
# Each builder returns a module whose parameter *names* follow one library's convention, and
# registers the role each trainable parameter should get.


class _PeftLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, adapters: list[str], reg: _Reg, dora: bool, lora_bias: bool):
        super().__init__()
        self.base_layer = _frozen(nn.Linear(d_in, d_out))
        self.lora_A = nn.ModuleDict({a: nn.Linear(d_in, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, d_out, bias=lora_bias) for a in adapters})
        for a in adapters:
            reg(self.lora_A[a].weight, Role.A)
            reg(self.lora_B[a].weight, Role.B)
            if lora_bias:
                reg(self.lora_B[a].bias, Role.B)
        self.adapters = list(adapters)
        if dora:
            self.lora_magnitude_vector = nn.ModuleDict()
            for a in adapters:
                holder = nn.Module()
                holder.weight = nn.Parameter(torch.ones(d_out))
                self.lora_magnitude_vector[a] = holder
                reg(holder.weight, Role.MAGNITUDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for a in self.adapters:
            out = out + self.lora_B[a](self.lora_A[a](x))
        return out


class _PeftEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, r: int, adapters: list[str], reg: _Reg):
        super().__init__()
        self.base_layer = _frozen(nn.Embedding(vocab, dim))
        self.lora_embedding_A = nn.ParameterDict({a: nn.Parameter(torch.zeros(r, vocab)) for a in adapters})
        self.lora_embedding_B = nn.ParameterDict({a: nn.Parameter(torch.randn(dim, r)) for a in adapters})
        for a in adapters:
            reg(self.lora_embedding_A[a], Role.EMBEDDING_A)
            reg(self.lora_embedding_B[a], Role.EMBEDDING_B)


class _LoralibLinear(nn.Linear):
    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg):
        super().__init__(d_in, d_out)
        _frozen(self)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        reg(self.lora_A, Role.A)
        reg(self.lora_B, Role.B)


class _LoralibEmbedding(nn.Embedding):
    def __init__(self, vocab: int, dim: int, r: int, reg: _Reg):
        super().__init__(vocab, dim)
        _frozen(self)
        self.lora_A = nn.Parameter(torch.zeros(r, vocab))
        self.lora_B = nn.Parameter(torch.randn(dim, r))
        reg(self.lora_A, Role.EMBEDDING_A)
        reg(self.lora_B, Role.EMBEDDING_B)


class _TorchtuneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg, dora: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.lora_a = nn.Linear(d_in, r, bias=False)
        self.lora_b = nn.Linear(r, d_out, bias=False)
        reg(self.lora_a.weight, Role.A)
        reg(self.lora_b.weight, Role.B)
        if dora:
            self.magnitude = nn.Parameter(torch.ones(d_out))
            reg(self.magnitude, Role.MAGNITUDE)


class _TwoLinear(nn.Module):
    """diffusers (down/up), kohya (lora_down/lora_up), NeMo (linear_in/linear_out)."""

    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg, names: tuple[str, str]):
        super().__init__()
        self.base = _frozen(nn.Linear(d_in, d_out))
        down, up = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
        setattr(self, names[0], down)
        setattr(self, names[1], up)
        reg(down.weight, Role.A)
        reg(up.weight, Role.B)


class _DeepSpeedChatLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.lora_right_weight = nn.Parameter(torch.randn(d_in, r))
        self.lora_left_weight = nn.Parameter(torch.zeros(r, d_out))
        reg(self.lora_right_weight, Role.A)
        reg(self.lora_left_weight, Role.B)


class _MinLoraParametrization(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, r: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, fan_in) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.lora_B @ self.lora_A


def _minlora_linear(d_in: int, d_out: int, r: int, reg: _Reg) -> nn.Module:
    layer = nn.Linear(d_in, d_out)
    _frozen(layer)
    par = _MinLoraParametrization(d_in, d_out, r)
    parametrize.register_parametrization(layer, "weight", par)
    reg(par.lora_A, Role.A)
    reg(par.lora_B, Role.B)
    return layer


class _PeftOtherAdapter(nn.Module):
    """PEFT AdaLoRA / LoHa / LoKr / VeRA naming: raw ``ParameterDict`` entries ``<factor>.<adapter>``.

    ``variant`` adds the optional tensors of each family: LoHa's Tucker cores ``hada_t1/t2``,
    LoKr's decomposed first factor ``lokr_w1_a/_b`` (instead of the full ``lokr_w1``).
    """

    def __init__(self, family: str, d_in: int, d_out: int, r: int, adapters: list[str], reg: _Reg, variant: bool):
        super().__init__()
        self.base_layer = _frozen(nn.Linear(d_in, d_out))

        def add(attr: str, shape: tuple[int, ...], role: Role | None) -> None:
            table = nn.ParameterDict({a: nn.Parameter(torch.randn(*shape) * 0.1) for a in adapters})
            setattr(self, attr, table)
            for a in adapters:
                if role is None:  # e.g. AdaLoRA's ranknum: a frozen parameter
                    table[a].requires_grad_(False)
                else:
                    reg(table[a], role)

        if family == "adalora":
            add("lora_A", (r, d_in), Role.A)
            add("lora_B", (d_out, r), Role.B)
            add("lora_E", (r, 1), Role.CORE)
            add("ranknum", (1,), None)
        elif family == "loha":
            for i in (1, 2):
                add(f"hada_w{i}_a", (d_out, r), Role.B)
                add(f"hada_w{i}_b", (r, d_in), Role.A)
                if variant:
                    add(f"hada_t{i}", (r, r, 1, 1), Role.CORE)
        elif family == "lokr":
            if variant:
                add("lokr_w1_a", (1, r), Role.B)
                add("lokr_w1_b", (r, 1), Role.A)
            else:
                add("lokr_w1", (1, 1), Role.CORE)
            add("lokr_w2_a", (d_out, r), Role.B)
            add("lokr_w2_b", (r, d_in), Role.A)
        elif family == "vera":
            add("vera_lambda_b", (d_out,), Role.B)
            add("vera_lambda_d", (r,), Role.A)
            self.register_buffer("vera_A", torch.randn(r, d_in))  # shared frozen projections
            self.register_buffer("vera_B", torch.randn(d_out, r))
        else:  # pragma: no cover
            raise LoraPlusError(f"unknown adapter family {family!r}")


class _DeclaredLinear(nn.Module):
    """Hand-written LoRA layer with unconventional names that declares its roles."""

    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg):
        super().__init__()
        self.frozen_w = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.squeeze = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.expand = nn.Parameter(torch.zeros(d_out, r))
        reg(self.squeeze, Role.A)
        reg(self.expand, Role.B)

    def loraplus_roles(self) -> dict[str, Role]:
        return {"squeeze": Role.A, "expand": Role.B}


#: Naming conventions :func:`lora_models` can draw from.
CONVENTION_NAMES = (
    "peft",
    "peft_dora",
    "peft_embedding",
    "peft_adalora",
    "peft_loha",
    "peft_lokr",
    "peft_vera",
    "loralib",
    "loralib_embedding",
    "torchtune",
    "torchtune_dora",
    "diffusers",
    "kohya",
    "nemo",
    "deepspeed_chat",
    "minlora",
    "declared",
)

#: Wrappers :func:`lora_models` can put around the whole model or around each block.
WRAPPER_NAMES = ("none", "ddp", "compile", "fsdp1", "checkpoint")


def _adapted_layer(conv: str, d_in: int, d_out: int, r: int, adapters: list[str], reg: _Reg, lora_bias: bool):
    if conv in ("peft", "peft_dora"):
        return _PeftLinear(d_in, d_out, r, adapters, reg, dora=conv == "peft_dora", lora_bias=lora_bias)
    if conv == "peft_embedding":
        return _PeftEmbedding(d_in + 3, d_out, r, adapters, reg)
    if conv in ("peft_adalora", "peft_loha", "peft_lokr", "peft_vera"):
        return _PeftOtherAdapter(conv[5:], d_in, d_out, r, adapters, reg, variant=lora_bias)
    if conv == "loralib":
        return _LoralibLinear(d_in, d_out, r, reg)
    if conv == "loralib_embedding":
        return _LoralibEmbedding(d_in + 3, d_out, r, reg)
    if conv in ("torchtune", "torchtune_dora"):
        return _TorchtuneLinear(d_in, d_out, r, reg, dora=conv == "torchtune_dora")
    if conv == "diffusers":
        return _TwoLinear(d_in, d_out, r, reg, ("down", "up"))
    if conv == "kohya":
        return _TwoLinear(d_in, d_out, r, reg, ("lora_down", "lora_up"))
    if conv == "nemo":
        return _TwoLinear(d_in, d_out, r, reg, ("linear_in", "linear_out"))
    if conv == "deepspeed_chat":
        return _DeepSpeedChatLinear(d_in, d_out, r, reg)
    if conv == "minlora":
        return _minlora_linear(d_in, d_out, r, reg)
    if conv == "declared":
        return _DeclaredLinear(d_in, d_out, r, reg)
    raise LoraPlusError(f"unknown convention {conv!r}; choose one of {CONVENTION_NAMES}")


class _Wrapper(nn.Module):
    """Puts a model under one attribute name, as DDP (``module``), torch.compile (``_orig_mod``),
    FSDP1 (``_fsdp_wrapped_module``) or activation checkpointing (``_checkpoint_wrapped_module``) do."""

    def __init__(self, inner: nn.Module, attr: str):
        super().__init__()
        setattr(self, attr, inner)


_WRAPPER_ATTR = {
    "ddp": "module",
    "compile": "_orig_mod",
    "fsdp1": "_fsdp_wrapped_module",
    "checkpoint": "_checkpoint_wrapped_module",
}


def _wrap(module: nn.Module, wrapper: str) -> nn.Module:
    if wrapper != "none" and wrapper not in _WRAPPER_ATTR:
        raise LoraPlusError(f"unknown wrapper {wrapper!r}; choose one of {WRAPPER_NAMES}")
    return module if wrapper == "none" else _Wrapper(module, _WRAPPER_ATTR[wrapper])


@dataclass
class GeneratedModel:
    """A generated model and the role each of its trainable parameters should get."""

    model: nn.Module
    expected: dict[str, Role]
    conventions: list[str] = field(default_factory=list)
    wrapper: str = "none"

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return (
            f"GeneratedModel(conventions={self.conventions}, wrapper={self.wrapper!r}, "
            f"expected={ {k: v.value for k, v in self.expected.items()} })"
        )


def build_model(
    layers: list[dict[str, Any]],
    *,
    wrapper: str = "none",
    block_wrapper: str = "none",
    head: bool = True,
    norm: bool = True,
    tie_head: bool = False,
    frozen_extra: bool = True,
) -> GeneratedModel:
    """Build a model from layer specs (``conv``, ``d_in``, ``d_out``, ``r``, ``adapters``, ``lora_bias``).

    This is what :func:`lora_models` draws from; it is public so a failing example can be rebuilt.
    """
    roles: dict[int, Role] = {}

    def reg(p: nn.Parameter, role: Role) -> None:
        roles[id(p)] = role

    blocks = nn.ModuleList()
    for spec in layers:
        layer = _adapted_layer(
            spec["conv"], spec["d_in"], spec["d_out"], spec["r"], list(spec["adapters"]), reg, spec["lora_bias"]
        )
        blocks.append(_wrap(layer, block_wrapper))
    root = nn.Module()
    root.layers = blocks
    if norm:
        root.final_norm = nn.LayerNorm(4)
    if head:
        root.head = nn.Linear(4, 3)
        if tie_head:
            root.lm_head = nn.Linear(4, 3, bias=False)
            root.lm_head.weight = root.head.weight  # tied: appears once in named_parameters()
    if frozen_extra:
        root.frozen_table = _frozen(nn.Embedding(5, 4))
    model = _wrap(root, wrapper)
    expected = {
        name: roles.get(id(p), Role.OTHER) for name, p in model.named_parameters() if p.requires_grad
    }
    return GeneratedModel(model, expected, [s["conv"] for s in layers], wrapper)


def lora_models(
    conventions: tuple[str, ...] = CONVENTION_NAMES,
    *,
    max_layers: int = 4,
    max_width: int = 8,
    wrappers: tuple[str, ...] = WRAPPER_NAMES,
) -> SearchStrategy[GeneratedModel]:
    """A hypothesis strategy of random LoRA-adapted models.

    Random depth and widths, naming conventions drawn from ``conventions``, one or two adapter
    names (``default``, ``default_0``, a user name), optional lora_bias, DoRA magnitudes,
    wrappers around the model and around each block, trainable heads and norms, tied and frozen
    parameters. Each example knows the roles its trainable parameters should get.

    Example:
        >>> from hypothesis import given, settings
        >>> import loraplus
        >>> from loraplus.testing import lora_models
        >>> @settings(max_examples=20, deadline=None)
        ... @given(lora_models())
        ... def test_roles(gen):
        ...     assert loraplus.classify(gen.model) == gen.expected
        >>> test_roles()
    """
    from hypothesis import strategies as st

    unknown = set(conventions) - set(CONVENTION_NAMES)
    if unknown or not conventions:
        raise LoraPlusError(f"conventions must be a non-empty subset of {CONVENTION_NAMES}, got {conventions}")
    adapter_names = st.sampled_from([["default"], ["default_0"], ["task_x"], ["default", "other"]])
    layer = st.fixed_dictionaries(
        {
            "conv": st.sampled_from(conventions),
            "d_in": st.integers(1, max_width),
            "d_out": st.integers(1, max_width),
            "r": st.integers(1, 4),
            "adapters": adapter_names,
            "lora_bias": st.booleans(),
        }
    )
    return st.builds(
        build_model,
        st.lists(layer, min_size=1, max_size=max_layers),
        wrapper=st.sampled_from(wrappers),
        block_wrapper=st.sampled_from(wrappers),
        head=st.booleans(),
        norm=st.booleans(),
        tie_head=st.booleans(),
        frozen_extra=st.booleans(),
    )


class TinyLoraModel(nn.Module):
    """See :func:`tiny_lora_model`."""

    def __init__(self, d: int, r: int, layers: int, n_out: int):
        super().__init__()

        def no_reg(p: nn.Parameter, role: Role) -> None:
            return None

        self.layers = nn.ModuleList(
            _PeftLinear(d, d, r, ["default"], no_reg, dora=False, lora_bias=False) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)
        with torch.no_grad():  # PEFT's default init: A random, B = 0
            for layer in self.layers:
                nn.init.zeros_(layer.lora_B["default"].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(self.norm(x))


def tiny_lora_model(d: int = 8, r: int = 2, layers: int = 2, n_out: int = 2, seed: int = 0) -> nn.Module:
    """A small PEFT-named LoRA model: ``layers`` adapted Linear layers, a LayerNorm and a head.

    Its trainable parameters are A and B factors (``layers.<i>.lora_A.default.weight``,
    ``layers.<i>.lora_B.default.weight``), a LayerNorm (no decay) and a head whose bias
    gets no decay. B starts at zero, as in PEFT.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyLoraModel(d, r, layers, n_out)


def assert_loraplus_groups(
    optimizer: Any,
    model: nn.Module,
    ratio: float | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    rules: RuleSpec | None = None,
    expected_roles: Mapping[str, Role] | None = None,
) -> None:
    """Assert that ``optimizer``'s param groups are sound LoRA+ groups for ``model``.

    Checks: no empty group; every group has ``role`` and ``param_names`` matching its params;
    every trainable parameter sits in exactly one group and no frozen one in any; each
    parameter's group role equals its role (``expected_roles``, or :func:`loraplus.classify`
    with ``rules``); every B group's lr is ``ratio`` times every A group's lr (when ``ratio``
    is given); A groups run at ``lr`` (when given); no-decay groups have weight decay 0 and
    decaying groups ``weight_decay`` (when given).

    Raises:
        AssertionError: listing every problem found.
    """
    if not isinstance(model, nn.Module):
        raise LoraPlusError(f"assert_loraplus_groups(optimizer, model): model must be an nn.Module, got {type(model).__name__}")
    problems: list[str] = []
    groups = getattr(optimizer, "param_groups", optimizer)
    named = dict(model.named_parameters())
    trainable = {id(p): n for n, p in named.items() if p.requires_grad}
    frozen = {id(p): n for n, p in named.items() if not p.requires_grad}
    if expected_roles is None:
        expected_roles = {lab.name: lab.role for lab in label_parameters(model, rules)}
    seen: dict[int, str] = {}
    for i, g in enumerate(groups):
        tag = f"group {i} ({g.get('name', '?')})"
        params = list(g["params"])
        names = list(g.get("param_names", []))
        if not params:
            problems.append(f"{tag} is empty")
        if "role" not in g:
            problems.append(f"{tag} has no 'role'")
        if len(names) != len(params):
            problems.append(f"{tag} has {len(params)} params but {len(names)} param_names")
        for name, p in zip(names, params):
            if named.get(name) is not p:
                problems.append(f"{tag}: param_names says {name!r} but holds another tensor")
        for p in params:
            if id(p) in frozen:
                problems.append(f"{tag} holds frozen parameter {frozen[id(p)]!r}")
                continue
            if id(p) not in trainable:
                problems.append(f"{tag} holds a tensor that is not a parameter of the model")
                continue
            name = trainable[id(p)]
            if id(p) in seen:
                problems.append(f"{name!r} is in {seen[id(p)]} and in {tag}")
            seen[id(p)] = tag
            want = expected_roles.get(name)
            if want is not None and g.get("role") != want.value:
                problems.append(f"{name!r} is in a {g.get('role')!r} group but its role is {want.value!r}")
        wd = g.get("weight_decay")
        if str(g.get("name", "")).endswith(".no_decay") and wd not in (0, 0.0):
            problems.append(f"{tag} is a no-decay group with weight_decay={wd}")
        elif weight_decay is not None and not str(g.get("name", "")).endswith(".no_decay") and wd != weight_decay:
            problems.append(f"{tag} has weight_decay={wd}, expected {weight_decay}")
    missing = [n for i, n in trainable.items() if i not in seen]
    if missing:
        problems.append(f"trainable parameters in no group: {missing[:5]}")
    a_lrs = [float(g["lr"]) for g in groups if g.get("role") == Role.A.value]
    # torchao (and compiled-optimizer recipes) keep lr as a float32 tensor: compare at float32 precision.
    tol = 1e-6 if any(isinstance(g.get("lr"), torch.Tensor) for g in groups) else 1e-12
    b_lrs = [float(g["lr"]) for g in groups if g.get("role") == Role.B.value]
    if lr is not None:
        problems += [f"an A group has lr={x}, expected {lr}" for x in a_lrs if not math.isclose(x, lr, rel_tol=tol)]
    if ratio is not None:
        for a in a_lrs:
            for b in b_lrs:
                if not math.isclose(b, ratio * a, rel_tol=tol):
                    problems.append(f"lr(B)/lr(A) = {b}/{a} = {b / a}, expected {ratio}")
    if problems:
        raise AssertionError("LoRA+ groups are wrong:\n  " + "\n  ".join(problems))
