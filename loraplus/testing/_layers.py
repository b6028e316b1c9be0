"""The adapted layers :func:`loraplus.testing.build_model` assembles, one builder per naming convention.

Each builder gives its parameters the *names* one library uses and registers, through ``reg``,
the role and weight-decay exemption each trainable parameter must get — decided here, by how
the layer was built, never by asking the labeller.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._errors import LoraPlusError
from .._role import Role

#: ``reg(param, role, no_decay=False, rule=False, pair=None)``: records what a parameter must get, decided by
#: how it was built; factors with the same ``pair`` tag form one A/B pair (one B·A product).
_Reg = Callable[..., None]


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
            reg(self.lora_A[a].weight, Role.A, pair=(id(self), a))
            reg(self.lora_B[a].weight, Role.B, pair=(id(self), a))
            if lora_bias:
                reg(self.lora_B[a].bias, Role.B, no_decay=True)  # the layer's own bias
        self.adapters = list(adapters)
        if dora:
            self.lora_magnitude_vector = nn.ModuleDict()
            for a in adapters:
                holder = nn.Module()
                holder.weight = nn.Parameter(torch.ones(d_out))
                self.lora_magnitude_vector[a] = holder
                reg(holder.weight, Role.MAGNITUDE, no_decay=True)

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
            reg(self.lora_embedding_A[a], Role.EMBEDDING_A, pair=(id(self), a))
            reg(self.lora_embedding_B[a], Role.EMBEDDING_B, pair=(id(self), a))


class _LoralibLinear(nn.Linear):
    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg):
        super().__init__(d_in, d_out)
        _frozen(self)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))
        reg(self.lora_A, Role.A, pair=id(self))
        reg(self.lora_B, Role.B, pair=id(self))


class _LoralibEmbedding(nn.Embedding):
    def __init__(self, vocab: int, dim: int, r: int, reg: _Reg):
        super().__init__(vocab, dim)
        _frozen(self)
        self.lora_A = nn.Parameter(torch.zeros(r, vocab))
        self.lora_B = nn.Parameter(torch.randn(dim, r))
        reg(self.lora_A, Role.EMBEDDING_A, pair=id(self))
        reg(self.lora_B, Role.EMBEDDING_B, pair=id(self))


class _TorchtuneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg, dora: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.lora_a = nn.Linear(d_in, r, bias=False)
        self.lora_b = nn.Linear(r, d_out, bias=False)
        reg(self.lora_a.weight, Role.A, pair=id(self))
        reg(self.lora_b.weight, Role.B, pair=id(self))
        if dora:
            self.magnitude = nn.Parameter(torch.ones(d_out))
            reg(self.magnitude, Role.MAGNITUDE, no_decay=True)


class _TwoLinear(nn.Module):
    """diffusers (down/up), kohya (lora_down/lora_up), NeMo (linear_in/linear_out)."""

    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg, names: tuple[str, str]):
        super().__init__()
        self.base = _frozen(nn.Linear(d_in, d_out))
        down, up = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
        setattr(self, names[0], down)
        setattr(self, names[1], up)
        reg(down.weight, Role.A, pair=id(self))
        reg(up.weight, Role.B, pair=id(self))


class _DeepSpeedChatLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.lora_right_weight = nn.Parameter(torch.randn(d_in, r))
        self.lora_left_weight = nn.Parameter(torch.zeros(r, d_out))
        reg(self.lora_right_weight, Role.A, pair=id(self))
        reg(self.lora_left_weight, Role.B, pair=id(self))


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
    reg(par.lora_A, Role.A, pair=id(par))
    reg(par.lora_B, Role.B, pair=id(par))
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
        reg(self.squeeze, Role.A, pair=id(self))
        reg(self.expand, Role.B, pair=id(self))

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
    "handwritten",
    "raw_named",
)

#: Conventions whose generic names count only when the factors form a rank bottleneck.
BOTTLENECK_CONVENTIONS = ("diffusers", "nemo")

#: Wrappers :func:`lora_models` can put around the whole model or around each block.
WRAPPER_NAMES = ("none", "ddp", "compile", "fsdp1", "checkpoint")


def adapted_layer(
    conv: str,
    d_in: int,
    d_out: int,
    r: int,
    adapters: list[str],
    reg: _Reg,
    lora_bias: bool,
    names: tuple[str, str] = ("w_in", "w_out"),
) -> nn.Module:
    """One adapted layer in convention ``conv`` (see :data:`CONVENTION_NAMES`)."""
    if conv in BOTTLENECK_CONVENTIONS:  # these names are adapters only as in -> r -> out with r below both
        d_in, d_out = max(d_in, r + 1), max(d_out, r + 1)
    if conv == "handwritten":
        return _HandWrittenLinear(d_in, d_out, r, reg, lora_bias)
    if conv == "raw_named":
        return _RawNamed(d_in, d_out, r, reg, names)
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




class _HandWrittenLinear(nn.Module):
    """The layer most tutorials write: bias-free ``nn.Linear`` factors named ``lora_A`` / ``lora_B``."""

    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg, lora_bias: bool):
        super().__init__()
        self.base = _frozen(nn.Linear(d_in, d_out))
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=lora_bias)
        self.scaling = 2.0
        reg(self.lora_A.weight, Role.A, pair=id(self))
        reg(self.lora_B.weight, Role.B, pair=id(self))
        if lora_bias:
            reg(self.lora_B.bias, Role.B, no_decay=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


class _RawNamed(nn.Module):
    """Raw factor parameters under arbitrary names (``names``): only ``rules=`` can say what they are."""

    def __init__(self, d_in: int, d_out: int, r: int, reg: _Reg, names: tuple[str, str]):
        super().__init__()
        self.frozen_w = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        down = nn.Parameter(torch.randn(r, d_in) * 0.1)
        up = nn.Parameter(torch.zeros(d_out, r))
        self.register_parameter(names[0], down)
        self.register_parameter(names[1], up)
        reg(down, Role.A, rule=True, pair=id(self))
        reg(up, Role.B, rule=True, pair=id(self))


class _Plain(nn.Module):
    """An ordinary block (no adapter) whose layers carry adapter-like names (``down``/``up``, ``A``/``B``,
    ``lora``, NeMo-like ``linear_in``/``linear_out``), in one of three shapes: an MLP that expands, a
    squeeze-excite block (1×1 convolutions d → r → d with biases) or a bottleneck adapter (Linear d → r,
    GELU, Linear r → d, with biases). The last two are rank bottlenecks; their biases make them ordinary."""

    def __init__(self, d: int, reg: _Reg, names: tuple[str, str], shape: str = "expand"):
        super().__init__()
        first: nn.Module
        second: nn.Module
        if shape == "expand":
            first, second = nn.Linear(d, 2 * d + 1), nn.Linear(2 * d + 1, d)
        elif shape == "squeeze_excite":
            first, second = nn.Conv2d(d, 2, 1), nn.Conv2d(2, d, 1)
        elif shape == "bottleneck_adapter":
            first, second = nn.Linear(d, 2), nn.Linear(2, d)
            self.act = nn.GELU()
        else:
            raise LoraPlusError(f"unknown plain block shape {shape!r}; choose one of {PLAIN_SHAPES}")
        setattr(self, names[0], first)
        setattr(self, names[1], second)
        for lin in (first, second):
            reg(lin.weight, Role.OTHER)
            reg(lin.bias, Role.OTHER, no_decay=True)


class _LayerScale(nn.Module):
    """A LayerScale (CaiT/timm ``ls1.gamma``): a 1-D per-channel scale that is neither a bias nor a norm
    weight, so it keeps the model's weight decay."""

    def __init__(self, d: int, reg: _Reg):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), 1e-5))
        reg(self.gamma, Role.OTHER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


#: Shapes of the ordinary blocks: an expanding MLP, a squeeze-excite block, a bottleneck adapter.
PLAIN_SHAPES = ("expand", "squeeze_excite", "bottleneck_adapter")

#: Names an ordinary (non-adapter) block may give its two layers.
PLAIN_NAMES = (("down", "up"), ("linear_in", "linear_out"), ("A", "B"), ("lora", "proj"))
