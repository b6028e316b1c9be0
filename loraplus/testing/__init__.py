"""Test helpers for code that trains with LoRA+: model generators with ground truth, and a group checker.

* :func:`tiny_lora_model` — a small deterministic PEFT-style LoRA model (no dependencies).
* :func:`lora_models` — a hypothesis strategy of random LoRA-adapted models in every naming
  convention loraplus supports, hand-written layers and raw factors under arbitrary names,
  hostile adapter names, ordinary layers named like adapters, wrappers, frozen and tied
  parameters, heads and norms. Each example is a :class:`GeneratedModel` that carries, for
  every trainable parameter, the role, learning rate and weight decay it **must** get —
  decided by how the generator built it, never by asking the labeller.
* :func:`assert_loraplus_groups` — checks an optimizer's groups against that ground truth.

``hypothesis`` is needed only for :func:`lora_models` (``pip install loraplus[testing]``).

Example:
    >>> import torch, loraplus
    >>> from loraplus.testing import assert_loraplus_groups, build_model
    >>> gen = build_model([dict(conv="handwritten", d_in=8, d_out=8, r=2, adapters=["default"], lora_bias=True)])
    >>> opt = loraplus.LoraPlus(torch.optim.AdamW, gen.model, ratio=4, lr=1e-3, weight_decay=0.1)
    >>> assert_loraplus_groups(opt, gen, ratio=4, lr=1e-3, weight_decay=0.1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .._errors import LoraPlusError
from .._role import Role
from ._check import assert_loraplus_groups
from ._layers import CONVENTION_NAMES, PLAIN_NAMES, WRAPPER_NAMES, _frozen, _PeftLinear
from ._layers import adapted_layer as _adapted_layer
from ._truth import GeneratedModel, expected_lr

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "ADAPTER_NAME_FRAGMENTS",
    "CONVENTION_NAMES",
    "GeneratedModel",
    "TinyLoraModel",
    "WRAPPER_NAMES",
    "assert_loraplus_groups",
    "build_model",
    "expected_lr",
    "lora_models",
    "tiny_lora_model",
]

#: Fragments adapter names are made of: names that look like biases, norms, embeddings and factors.
ADAPTER_NAME_FRAGMENTS = ("default", "bias", "norm", "ln", "embed", "down", "up", "A", "B", "lora", "task", "0", "2")


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


def build_model(
    layers: list[dict[str, Any]],
    *,
    wrapper: str = "none",
    block_wrapper: str = "none",
    head: bool = True,
    norm: bool = True,
    tie_head: bool = False,
    frozen_extra: bool = True,
    plain: list[int] = (),  # type: ignore[assignment]
    hostile_module: str | None = None,
    layer_scale: bool = False,
) -> GeneratedModel:
    """Build a model from layer specs and record what each trainable parameter must get.

    A layer spec has ``conv`` (one of :data:`CONVENTION_NAMES`), ``d_in``, ``d_out``, ``r``,
    ``adapters`` (names), ``lora_bias`` and, for ``raw_named``, ``names`` (the two factors'
    attribute names). ``plain`` adds ordinary blocks: index ``i`` takes the names
    ``PLAIN_NAMES[i % 4]`` (``down``/``up``, ``linear_in``/``linear_out``, ``A``/``B``, ``lora``/``proj``) and
    the shape ``PLAIN_SHAPES[i // 4 % 3]`` (an MLP that expands, a squeeze-excite block of biased 1×1
    convolutions d → 2 → d, a bottleneck adapter with biases d → 2 → d); ``hostile_module``
    adds a plain ``nn.Linear`` under that attribute name; ``layer_scale`` adds a LayerScale
    (``ls1.gamma``, a 1-D parameter that must keep weight decay). This is what :func:`lora_models` draws
    from; it is public so a failing example can be rebuilt.
    """
    truth: dict[int, tuple[Role, bool, bool, Any]] = {}

    def reg(p: torch.Tensor, role: Role, no_decay: bool = False, rule: bool = False, pair: Any = None) -> None:
        truth[id(p)] = (role, no_decay, rule, pair)

    blocks = nn.ModuleList()
    for spec in layers:
        layer = _adapted_layer(
            spec["conv"],
            spec["d_in"],
            spec["d_out"],
            spec["r"],
            list(spec["adapters"]),
            reg,
            spec["lora_bias"],
            tuple(spec.get("names", ("w_in", "w_out"))),
        )
        blocks.append(_wrap(layer, block_wrapper))
    root = nn.Module()
    root.layers = blocks
    if plain:
        from ._layers import PLAIN_SHAPES, _Plain

        k = len(PLAIN_NAMES)
        root.plain = nn.ModuleList(
            _Plain(4, reg, PLAIN_NAMES[i % k], PLAIN_SHAPES[(i // k) % len(PLAIN_SHAPES)]) for i in plain
        )
    if hostile_module is not None:
        lin = nn.Linear(4, 4)
        setattr(root, hostile_module, lin)
        reg(lin.weight, Role.OTHER)
        reg(lin.bias, Role.OTHER, no_decay=True)
    if layer_scale:
        from ._layers import _LayerScale

        root.ls1 = _LayerScale(4, reg)
    if norm:
        root.final_norm = nn.LayerNorm(4)
        reg(root.final_norm.weight, Role.OTHER, no_decay=True)
        reg(root.final_norm.bias, Role.OTHER, no_decay=True)
    if head:
        root.head = nn.Linear(4, 3)
        reg(root.head.weight, Role.OTHER)
        reg(root.head.bias, Role.OTHER, no_decay=True)
        if tie_head:
            root.lm_head = nn.Linear(4, 3, bias=False)
            root.lm_head.weight = root.head.weight  # tied: appears once in named_parameters()
    if frozen_extra:
        root.frozen_table = _frozen(nn.Embedding(5, 4))
    model = _wrap(root, wrapper)
    expected: dict[str, Role] = {}
    no_decay: set[str] = set()
    rules: dict[str, Role] = {}
    sides: dict[Any, dict[Role, str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in truth:  # pragma: no cover - a builder forgot to register a parameter
            raise LoraPlusError(f"generator bug: no ground truth for {name!r}")
        role, nd, rule, pair = truth[id(p)]
        expected[name] = role
        if pair is not None:
            sides.setdefault(pair, {})[Role.A if role.a_side else Role.B] = name
        if nd:
            no_decay.add(name)
        if rule:
            rules[name] = role  # the exact name, as a glob: raw factors are only known through rules=
    pairs = frozenset((s[Role.A], s[Role.B]) for s in sides.values() if len(s) == 2)
    return GeneratedModel(
        model, expected, frozenset(no_decay), rules or None, [s["conv"] for s in layers], wrapper, pairs
    )


def lora_models(
    conventions: tuple[str, ...] = CONVENTION_NAMES,
    *,
    max_layers: int = 4,
    max_width: int = 8,
    wrappers: tuple[str, ...] = WRAPPER_NAMES,
) -> SearchStrategy[GeneratedModel]:
    """A hypothesis strategy of random LoRA-adapted models with ground truth.

    Random depth and widths; conventions drawn from ``conventions`` (mixed families in one model);
    one or two adapter names made of hostile fragments (``gender_bias``, ``norm_task``, ``ln_2``,
    ``A``, ``up`` …); optional lora_bias and DoRA magnitudes; factors as bias-free ``nn.Linear``
    submodules and as raw parameters under arbitrary names (with the ``rules=`` that name them);
    ordinary blocks whose layers are named ``down``/``up``/``A``/``B``/``lora`` without being
    adapters; a plain layer under a hostile name; wrappers around the model and around each
    block; trainable heads and norms; a LayerScale (1-D, decays); tied and frozen parameters.

    Example:
        >>> from hypothesis import given, settings
        >>> import loraplus
        >>> from loraplus.testing import lora_models
        >>> @settings(max_examples=20, deadline=None)
        ... @given(lora_models())
        ... def test_roles(gen):
        ...     assert loraplus.classify(gen.model, gen.rules) == gen.expected
        >>> test_roles()
    """
    from hypothesis import strategies as st

    unknown = set(conventions) - set(CONVENTION_NAMES)
    if unknown or not conventions:
        raise LoraPlusError(f"conventions must be a non-empty subset of {CONVENTION_NAMES}, got {conventions}")
    fragment = st.sampled_from(ADAPTER_NAME_FRAGMENTS)
    adapter_name = st.lists(fragment, min_size=1, max_size=2).map("_".join).filter(lambda n: not n[0].isdigit())
    adapter_names = st.lists(adapter_name, min_size=1, max_size=2, unique=True)
    ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: n not in _RESERVED)
    layer = st.fixed_dictionaries(
        {
            "conv": st.sampled_from(conventions),
            "d_in": st.integers(1, max_width),
            "d_out": st.integers(1, max_width),
            "r": st.integers(1, 4),
            "adapters": adapter_names,
            "lora_bias": st.booleans(),
            "names": st.lists(ident, min_size=2, max_size=2, unique=True).map(tuple),
        }
    )
    return st.builds(
        build_model,
        st.lists(layer, min_size=1, max_size=max_layers),
        wrapper=st.sampled_from(wrappers),
        block_wrapper=st.sampled_from(wrappers),
        head=st.booleans(),
        norm=st.booleans(),
        layer_scale=st.booleans(),
        tie_head=st.booleans(),
        frozen_extra=st.booleans(),
        plain=st.lists(st.integers(0, 3 * len(PLAIN_NAMES) - 1), max_size=2),
        hostile_module=st.one_of(st.none(), adapter_name.filter(lambda n: n not in _RESERVED)),
    )


#: Attribute names a generated module must not take (they exist on nn.Module or the layers).
_RESERVED = frozenset(
    {"base", "frozen_w", "training", "forward", "weight", "bias", "layers", "head", "lm_head", "final_norm", "plain",
     "ls1", "frozen_table", "type", "float", "half", "double", "cuda", "cpu", "to", "train", "eval", "apply", "zero_grad"}
)


class TinyLoraModel(nn.Module):
    """See :func:`tiny_lora_model`."""

    def __init__(self, d: int, r: int, layers: int, n_out: int):
        super().__init__()

        def no_reg(p: nn.Parameter, role: Role, **_: bool) -> None:
            return None

        lora = [_PeftLinear(d, d, r, ["default"], no_reg, dora=False, lora_bias=False) for _ in range(layers)]
        self.layers = nn.ModuleList(lora)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)
        with torch.no_grad():  # PEFT's default init: A random, B = 0
            for layer in lora:
                nn.init.zeros_(cast(nn.Linear, layer.lora_B["default"]).weight)

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
