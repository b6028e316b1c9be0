"""What a Monitor watches: the A/B pairs an optimizer updates, with their groups, hosts and notes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import Label, Origin, RuleSpec, label_model
from .._layouts import NAME_INDEX, Family, NameMatcher
from .._pairs._pairs import Pair, pair_labels
from .._role import Role
from ._history import AdapterInfo

__all__ = ["Targets", "find_targets", "unwrap_optimizer"]

DORA_NOTE = (
    "DoRA: ΔW terms are those of the direction's low-rank update s·B·A, before DoRA's magnitude vector and "
    "column normalisation (which the terms exclude)"
)


@dataclass(frozen=True)
class Targets:
    """The monitored adapters and what is known about each.

    Attributes:
        pairs: the pairs whose two factors the optimizer updates, in model order.
        adapters: one :class:`AdapterInfo` per pair (key, names, scaling, param groups).
        hosts: per pair, the module whose input is the layer input; ``None`` where activation terms
            are not measured (or not asked for).
        unpaired: ``{factor name: reason}`` for adapter factors not monitored.
        notes: ``{key: note}`` where the ΔW terms are not plain s·B·A (DoRA).
        missing: ``{key: reason}`` for adapters without activation terms.
    """

    pairs: list[Pair]
    adapters: list[AdapterInfo]
    hosts: list[nn.Module | None]
    unpaired: dict[str, str]
    notes: dict[str, str]
    missing: dict[str, str]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers that expose it as ``.optimizer`` (accelerate)."""
    for _ in range(8):
        if hasattr(optimizer, "_optimizer_step_pre_hooks"):
            break
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _labels_from_groups(optimizer: torch.optim.Optimizer) -> list[Label]:
    """Labels from the groups' ``role`` and ``param_names``; the layer key from the names' layout pattern."""
    labels: list[Label] = []
    holder = nn.Module()  # no model: names and roles come from the groups
    matcher = NameMatcher(NAME_INDEX, {})
    for i, g in enumerate(optimizer.param_groups):
        names = g.get("param_names")
        role = g.get("role")
        if names is None or role is None:
            raise LoraPlusError(
                f"param group {i} of {type(optimizer).__name__} has no 'param_names'/'role', so the monitor cannot "
                "tell A from B without the model; pass the model: loraplus.Monitor(optimizer, model)"
            )
        for name, p in zip(names, g["params"]):
            role_ = Role.coerce(role)
            # no modules to check partners or holders against: the most specific pattern of the group's role
            # among layouts that need no structural check
            hit = next((h for h in matcher.candidates(name) if h.layout.requires is None
                        and ((h.factor.role.a_side and role_.a_side) or (h.factor.role.b_side and role_.b_side))), None)
            labels.append(Label(name, p, role_, Origin.RULE, f"group {g.get('name', i)}", holder,
                                None if hit is None else hit.layout, None if hit is None else hit.factor,
                                name.rpartition(".")[0] if hit is None else hit.holder,
                                "" if hit is None else hit.adapter))
    return labels


def _is_dora(pair: Pair) -> bool:
    """Whether the pair's layer applies DoRA (its layout's family)."""
    return pair.layout is not None and pair.layout.family is Family.DORA


def find_targets(
    optimizer: torch.optim.Optimizer, model: nn.Module | None, rules: RuleSpec | None, activations: bool
) -> Targets:
    """Pair the factors (of ``model``, or named by the optimizer's groups) and keep those the optimizer updates.

    Raises:
        LoraPlusError: when no pair is left.
    """
    if model is not None:
        labels, modules = label_model(model, rules)
    else:
        labels, modules = _labels_from_groups(optimizer), {}
    found, rest = pair_labels(labels, modules)
    unpaired = {name: u.reason for name, u in rest.items()}
    where: dict[int, int] = {}  # parameter -> index of its param group
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            where.setdefault(id(p), gi)
    pairs: list[Pair] = []
    for pair in found:
        missing = [n for n, t in ((pair.a_name, pair.a), (pair.b_name, pair.b)) if id(t) not in where]
        if missing:
            unpaired[pair.a_name] = unpaired[pair.b_name] = f"{missing[0]!r} is not in the optimizer"
        else:
            pairs.append(pair)
    if not pairs:
        shown = "; ".join(f"{n}: {r}" for n, r in list(unpaired.items())[:5]) or "no adapter factors found"
        raise LoraPlusError(
            f"Monitor found no A/B factor pair to monitor ({shown}). Pass rules= (or the model) so that "
            "each adapted layer has one A and one B factor"
        )
    no_act: dict[str, str] = {}
    hosts: list[nn.Module | None] = []
    for p in pairs:
        host = modules.get(p.host) if activations else None
        if activations and host is None:
            no_act[p.key] = "adapted layer module not found"
        elif isinstance(getattr(host, "base_layer", host), nn.MultiheadAttention) or (activations and p.kind == "conv"):
            # MHA takes (query, key, value); conv inputs are not rows of in-features
            no_act[p.key] = "activation terms are measured for Linear and Embedding adapters only"
            host = None
        hosts.append(host)
    adapters = [
        AdapterInfo(p.key, p.layer, p.adapter, p.layer_group, p.scaling, where[id(p.a)], where[id(p.b)]) for p in pairs
    ]
    notes = {p.key: DORA_NOTE for p in pairs if _is_dora(p)}
    return Targets(pairs, adapters, hosts, unpaired, notes, no_act)
