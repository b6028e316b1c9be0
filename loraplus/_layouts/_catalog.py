"""The LoRA implementations loraplus knows: one :class:`Layout` record each.

Adding a library means adding one record here (and its tests). Records whose factor patterns
coincide (PEFT LoRA, DoRA and KaSA layers all name ``lora_A.<adapter>.weight``) are told apart
by their ``requires`` check on the holder; a record with a check is tried before one without.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .._role import Role
from ._record import Detector, Factor, Family, HolderCheck, Layout, Orientation, number, ratio

__all__ = ["LAYOUTS"]

A, B, EA, EB, MAG, CORE = Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B, Role.MAGNITUDE, Role.CORE


def _f(pattern: str, role: Role, partner: str | None = None, bias: bool = False) -> Factor:
    return Factor(tuple(pattern.split(".")), role, partner, bias)


# ----------------------------------------------------------------------------------------------- scaling readers
# Each reads the s in ΔW = s·B·A from the module that holds the factors (None: not recorded).


def _peft_scaling(holder: nn.Module, adapter: str) -> float | None:
    table = holder.__dict__.get("scaling")  # {adapter: alpha / r} (alpha / sqrt(r) with rsLoRA)
    return number(table.get(adapter)) if isinstance(table, Mapping) else None


def _attr_scaling(holder: nn.Module, adapter: str) -> float | None:
    """loralib, litgpt and hand-written layers keep ``scaling``; minLoRA parametrizations ``scale``."""
    attrs = holder.__dict__
    for attr in ("scaling", "scale"):
        if attr in attrs:
            return number(attrs[attr])
    return None


def _torchtune_scaling(holder: nn.Module, adapter: str) -> float | None:
    attrs = holder.__dict__  # LoRALinear: (alpha / rank) * lora_b(lora_a(x)); DoRALinear keeps `scaling`
    return ratio(attrs.get("alpha"), attrs.get("rank")) or number(attrs.get("scaling"))


def _kohya_scaling(holder: nn.Module, adapter: str) -> float | None:
    attrs = holder.__dict__  # LoRAModule: alpha buffer / lora_dim (also kept as .scale); mmpretrain: .scaling
    alpha = holder._buffers.get("alpha") if "alpha" in holder._buffers else attrs.get("alpha")
    return ratio(alpha, attrs.get("lora_dim")) or number(attrs.get("scale")) or number(attrs.get("scaling"))


def _diffusers_scaling(holder: nn.Module, adapter: str) -> float | None:
    attrs = holder.__dict__  # LoRALinearLayer: up(down(x)) * network_alpha / rank, or 1 without alpha
    if "rank" not in attrs:
        return None
    alpha = attrs.get("network_alpha")
    return 1.0 if alpha is None else ratio(alpha, attrs["rank"])


def _nemo_scaling(holder: nn.Module, adapter: str) -> float | None:
    return ratio(holder.__dict__.get("alpha"), holder.__dict__.get("dim"))


def _dschat_scaling(holder: nn.Module, adapter: str) -> float | None:
    return number(holder.__dict__.get("lora_scaling"))  # LinearLayer_LoRA keeps lora_scaling / lora_dim


# ----------------------------------------------------------------------------------------------- holder checks


def _has_entry(attr: str) -> HolderCheck:
    """The holder's ``attr`` (a ModuleDict or ParameterDict of adapters) has an entry for this adapter."""

    def check(holder: nn.Module, adapter: str) -> bool:
        sub = holder._modules.get(attr)
        return sub is not None and (adapter in sub._modules or adapter in sub._parameters)

    return check


def _has_param(attr: str) -> HolderCheck:
    def check(holder: nn.Module, adapter: str) -> bool:
        return attr in holder._parameters

    return check


_PEFT = "PEFT"
_peft_lora_factors = (
    _f("lora_A.*.weight", A, "lora_B"),
    _f("lora_B.*.weight", B, "lora_A"),
    _f("lora_B.*.bias", B, "lora_A", bias=True),
    _f("lora_embedding_A.*", EA, "lora_embedding_B"),
    _f("lora_embedding_B.*", EB, "lora_embedding_A"),
)
_peft_lora_types = Detector((("peft.tuners.lora.layer", "LoraLayer"),))

PEFT_DORA = Layout(
    "PEFT DoRA", _PEFT, Family.DORA,
    (*_peft_lora_factors, _f("lora_magnitude_vector.*.weight", MAG), _f("lora_magnitude_vector.*", MAG)),
    scaling=_peft_scaling, detect=_peft_lora_types, requires=_has_entry("lora_magnitude_vector"),
)
PEFT_KASA = Layout(
    "PEFT KaSA", _PEFT, Family.KASA, (*_peft_lora_factors, _f("lora_diag.*", CORE)), product=False,
    scaling=_peft_scaling, detect=_peft_lora_types, requires=_has_entry("lora_diag"),
    not_a_product="KaSA factors do not form one B·A product",
)
PEFT_LORA = Layout("PEFT", _PEFT, Family.LORA, _peft_lora_factors, scaling=_peft_scaling, detect=_peft_lora_types)
PEFT_ADALORA = Layout(
    "PEFT AdaLoRA", _PEFT, Family.ADALORA,
    (_f("lora_A.*", A, "lora_B"), _f("lora_B.*", B, "lora_A"), _f("lora_E.*", CORE, "lora_A")),
    product=False, scaling=_peft_scaling, detect=Detector((("peft.tuners.adalora.layer", "AdaLoraLayer"),)),
    not_a_product="AdaLoRA factors do not form one B·A product",
)
PEFT_LOHA = Layout(
    "PEFT LoHa", _PEFT, Family.LOHA,
    (_f("hada_w1_a.*", B), _f("hada_w2_a.*", B), _f("hada_w1_b.*", A), _f("hada_w2_b.*", A),
     _f("hada_t1.*", CORE), _f("hada_t2.*", CORE)),
    product=False, detect=Detector((("peft.tuners.loha.layer", "LoHaLayer"),)),
    not_a_product="LoHa factors do not form one B·A product",
)
PEFT_LOKR = Layout(
    "PEFT LoKr", _PEFT, Family.LOKR,
    (_f("lokr_w1_a.*", B), _f("lokr_w2_a.*", B), _f("lokr_w1_b.*", A), _f("lokr_w2_b.*", A),
     _f("lokr_w1.*", CORE), _f("lokr_w2.*", CORE), _f("lokr_t2.*", CORE)),
    product=False, detect=Detector((("peft.tuners.lokr.layer", "LoKrLayer"),)),
    not_a_product="LoKr factors do not form one B·A product",
)
PEFT_VERA = Layout(
    "PEFT VeRA", _PEFT, Family.VERA, (_f("vera_lambda_d.*", A), _f("vera_lambda_b.*", B)),
    product=False, detect=Detector((("peft.tuners.vera.layer", "VeraLayer"),)),
    not_a_product="VeRA factors do not form one B·A product",
)
HAND_WRITTEN = Layout(  # `self.lora_A = nn.Linear(d, r, bias=False)`; a literal segment beats AdaLoRA's wildcard
    "hand-written nn.Linear", "your code", Family.LORA,
    (_f("lora_A.weight", A, "lora_B"), _f("lora_B.weight", B, "lora_A"), _f("lora_B.bias", B, "lora_A", bias=True)),
    scaling=_attr_scaling,
)
MINLORA = Layout(  # parametrizations: layer.parametrizations.weight.0.lora_A; embeddings stored transposed
    "minLoRA", "minLoRA", Family.LORA, (_f("lora_A", A, "lora_B"), _f("lora_B", B, "lora_A")),
    embedding_orientation=Orientation.TRANSPOSED, scaling=_attr_scaling, within="parametrizations",
)
LORALIB = Layout(  # litgpt's LoRA layers follow loralib's layout: one record detects both
    "loralib/litgpt", "loralib, litgpt", Family.LORA, (_f("lora_A", A, "lora_B"), _f("lora_B", B, "lora_A")),
    scaling=_attr_scaling, detect=Detector((("loralib.layers", "LoRALayer"), ("litgpt.lora", "LoRALayer"))),
)
TORCHTUNE_DORA = Layout(
    "torchtune DoRA", "torchtune", Family.DORA,
    (_f("lora_a.weight", A, "lora_b"), _f("lora_b.weight", B, "lora_a"), _f("magnitude", MAG, "lora_a")),
    scaling=_torchtune_scaling, detect=Detector((("torchtune.modules.peft.dora", "DoRALinear"),)),
    requires=_has_param("magnitude"),
)
TORCHTUNE = Layout(
    "torchtune", "torchtune", Family.LORA, (_f("lora_a.weight", A, "lora_b"), _f("lora_b.weight", B, "lora_a")),
    scaling=_torchtune_scaling, detect=Detector((("torchtune.modules.peft.lora", "LoRALinear"),)),
)
KOHYA = Layout(
    "kohya/mmpretrain", "kohya sd-scripts, mmpretrain", Family.LORA,
    (_f("lora_down.weight", A, "lora_up"), _f("lora_up.weight", B, "lora_down")), scaling=_kohya_scaling,
)
DIFFUSERS = Layout(  # legacy attention processors' LoRALinearLayer; `down`/`up` are also ordinary layer names
    "diffusers", "diffusers", Family.LORA, (_f("down.weight", A, "up"), _f("up.weight", B, "down")),
    generic=True, scaling=_diffusers_scaling,
)
DEEPSPEED_CHAT = Layout(
    "DeepSpeed-Chat", "DeepSpeed-Chat", Family.LORA,
    (_f("lora_right_weight", A, "lora_left_weight"), _f("lora_left_weight", B, "lora_right_weight")),
    orientation=Orientation.TRANSPOSED, scaling=_dschat_scaling,
)
NEMO_DORA = Layout(
    "NeMo DoRA", "NVIDIA NeMo", Family.DORA,
    (_f("linear_in.weight", A, "linear_out"), _f("linear_out.weight", B, "linear_in"),
     _f("weight_magnitude", MAG, "linear_in")),
    generic=True, scaling=_nemo_scaling, requires=_has_param("weight_magnitude"),
)
NEMO = Layout(
    "NeMo", "NVIDIA NeMo", Family.LORA, (_f("linear_in.weight", A, "linear_out"), _f("linear_out.weight", B, "linear_in")),
    generic=True, scaling=_nemo_scaling,
)

#: Every layout, in the order the docs list them. A record with a ``requires`` check is matched before
#: one without that shares its patterns; AdaLoRA (whose layer class subclasses PEFT's LoRA layer) before LoRA.
LAYOUTS: tuple[Layout, ...] = (
    PEFT_LORA, PEFT_DORA, PEFT_KASA, PEFT_ADALORA, PEFT_LOHA, PEFT_LOKR, PEFT_VERA, HAND_WRITTEN,
    LORALIB, MINLORA, TORCHTUNE, TORCHTUNE_DORA, KOHYA, DIFFUSERS, DEEPSPEED_CHAT, NEMO, NEMO_DORA,
)

#: Fallback scaling reader for pairs found without a layout (declared roles, rules): ``scaling`` or ``scale``.
generic_scaling = _attr_scaling
