"""Layouts as data: one record per LoRA implementation, read by fields — and ordinary blocks stay ordinary.

Ground truth comes from how each test builds its model: a squeeze-excite block or a bottleneck
adapter is built by the test, so its parameters must get ``lr`` and normal decay whatever they
are called.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import loraplus
from loraplus import Role
from loraplus._layouts import CONVENTIONS, LAYOUTS, NAME_INDEX, Family, Orientation, _catalog

ROOT = Path(__file__).resolve().parent.parent


class SqueezeExcite(nn.Module):
    """A trainable squeeze-excite block: 1×1 convolutions 64 → 4 → 64 with biases (not a LoRA pair)."""

    def __init__(self, channels: int = 64, reduced: int = 4) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, reduced, 1)
        self.up = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.up(torch.relu(self.down(w))))


class HoulsbyAdapter(nn.Module):
    """A bottleneck adapter (Houlsby et al.): Linear 32 → 8, GELU, Linear 8 → 32, with biases."""

    def __init__(self, d: int = 32, r: int = 8) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = nn.GELU()
        self.up = nn.Linear(r, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class LoraLinear(nn.Module):
    """A PEFT-named LoRA layer, so the model has adapters next to the ordinary blocks."""

    def __init__(self, d: int = 32, r: int = 2) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d, d).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d, bias=False)})


def _model_with(block: nn.Module) -> nn.Module:
    model = nn.Module()
    model.lora = LoraLinear()
    model.block = block
    return model


@pytest.mark.parametrize("block", [SqueezeExcite, HoulsbyAdapter], ids=["squeeze_excite", "bottleneck_adapter"])
def test_ordinary_down_up_blocks_get_lr_and_normal_decay(block):
    model = _model_with(block())
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3, weight_decay=0.1)
    where = {n: (g["lr"], g["weight_decay"], g["role"]) for g in opt.param_groups for n in g["param_names"]}
    assert where["block.down.weight"] == where["block.up.weight"] == (1e-3, 0.1, "other")
    assert where["block.down.bias"] == where["block.up.bias"] == (1e-3, 0.0, "other")
    assert where["lora.lora_B.default.weight"] == (4e-3, 0.1, "B")
    found = loraplus.pairs(model)
    assert [p.layer for p in found] == ["lora"] and not found.unpaired


def test_a_bias_free_down_up_bottleneck_is_still_a_diffusers_pair():
    """The generic-name rule is bias-free *and* bottleneck: diffusers' LoRALinearLayer has no biases."""
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.down = nn.Linear(32, 4, bias=False)
    model.attn.up = nn.Linear(4, 32, bias=False)
    roles = loraplus.classify(model)
    assert roles == {"attn.down.weight": Role.A, "attn.up.weight": Role.B}
    (pair,) = loraplus.pairs(model)
    assert pair.convention == "diffusers" and pair.layout is _catalog.DIFFUSERS


def test_one_biased_factor_makes_the_pair_ordinary():
    model = nn.Module()
    model.adapter = nn.Module()
    model.adapter.linear_in = nn.Linear(32, 4, bias=False)
    model.adapter.linear_out = nn.Linear(4, 32, bias=True)  # NeMo's LoRA adapter has no bias
    assert set(loraplus.classify(model).values()) == {Role.OTHER}


def test_a_real_lora_with_biased_down_up_is_labelled_by_rules():
    """What the docs show for a LoRA whose generic-named factors carry biases."""
    model = _model_with(HoulsbyAdapter())
    rules = {"*.block.down.weight": Role.A, "*.block.up.weight": Role.B, "block.down.weight": Role.A,
             "block.up.weight": Role.B}
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3, weight_decay=0.1, rules=rules)
    where = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert where["block.up.weight"] == 4e-3 and where["block.down.weight"] == 1e-3
    assert where["block.up.bias"] == 1e-3


@pytest.mark.parametrize("block", [SqueezeExcite, HoulsbyAdapter], ids=["squeeze_excite", "bottleneck_adapter"])
def test_ordinary_blocks_inside_peft_modules_to_save(block):
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(64 if block is SqueezeExcite else 32, 8)
            self.block = block()

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(target_modules=["q"], r=2, modules_to_save=["block"]))
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3, weight_decay=0.1)
    where = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["param_names"]}
    copies = [n for n in where if ".block.modules_to_save.default." in n]
    assert len(copies) == 4, sorted(where)
    for name in copies:
        assert where[name] == (1e-3, 0.0 if name.endswith("bias") else 0.1), name
    assert where["base_model.model.q.lora_B.default.weight"] == (4e-3, 0.1)
    assert [p.layer for p in loraplus.pairs(model)] == ["base_model.model.q"]


# ----------------------------------------------------------------------------------------------- records


def test_every_convention_row_is_a_factor_of_one_record():
    assert len(CONVENTIONS) == sum(len(layout.factors) for layout in LAYOUTS)
    for conv in CONVENTIONS:
        assert conv.layout in LAYOUTS
        assert any(f.pattern == conv.pattern and f.role is conv.role for f in conv.layout.factors)
    names = [layout.name for layout in LAYOUTS]
    assert len(names) == len(set(names))


def test_every_documented_library_has_a_record():
    expected = {"PEFT", "PEFT DoRA", "PEFT AdaLoRA", "PEFT LoHa", "PEFT LoKr", "PEFT VeRA", "PEFT KaSA",
                "loralib/litgpt", "torchtune", "torchtune DoRA", "minLoRA", "kohya/mmpretrain", "diffusers",
                "DeepSpeed-Chat", "NeMo", "NeMo DoRA", "hand-written nn.Linear"}
    assert {layout.name for layout in LAYOUTS} == expected
    assert {layout.family for layout in LAYOUTS if not layout.product} == {
        Family.ADALORA, Family.LOHA, Family.LOKR, Family.VERA, Family.KASA}
    assert {layout.name for layout in LAYOUTS if layout.orientation is Orientation.TRANSPOSED} == {"DeepSpeed-Chat"}
    assert {layout.name for layout in LAYOUTS if layout.generic} == {"diffusers", "NeMo", "NeMo DoRA"}


def test_renaming_a_record_changes_nothing_but_the_display(monkeypatch):
    """Scaling, pairing and roles come from fields: a layout under another name behaves the same."""
    from loraplus._labels import _label
    from loraplus._layouts import NameIndex

    class Kohya(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lora_dim = 4
            self.register_buffer("alpha", torch.tensor(2.0))
            self.lora_down = nn.Linear(6, 4, bias=False)
            self.lora_up = nn.Linear(4, 5, bias=False)

    model = nn.Module()
    model.k = Kohya()
    before = loraplus.pairs(model)
    renamed = tuple(dataclasses.replace(layout, name=f"renamed {i}", library="x") for i, layout in enumerate(LAYOUTS))
    monkeypatch.setattr(_label, "LAYOUTS", renamed)
    monkeypatch.setattr(_label, "NAME_INDEX", NameIndex(renamed))
    after = loraplus.pairs(model)
    assert [p.scaling for p in after] == [p.scaling for p in before] == [2 / 4]
    assert [p.convention for p in after] != [p.convention for p in before]
    assert [(p.a_name, p.b_name, p.orientation) for p in after] == [(p.a_name, p.b_name, p.orientation) for p in before]


def test_detection_by_type_never_imports_a_library():
    import subprocess
    import sys

    code = ("import sys, torch, loraplus; m = loraplus.testing.tiny_lora_model(); loraplus.classify(m); "
            "print(sorted(k for k in ('peft', 'torchtune', 'loralib', 'litgpt', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_name_index_prefers_the_most_specific_pattern():
    hits = NAME_INDEX.tail("x.lora_A.weight".split("."))
    assert hits[0][0] is _catalog.HAND_WRITTEN  # a literal segment beats AdaLoRA's wildcard of the same length
    hits = NAME_INDEX.tail("x.lora_A.default.weight".split("."))
    assert [lay.name for lay, _ in hits][:3] == ["PEFT DoRA", "PEFT KaSA", "PEFT"]  # checked records first


# ----------------------------------------------------------------------------------------------- no display strings


_DISPLAY_FIELDS = {"convention", "source", "reason", "name", "library", "description", "label"}


def test_no_code_branches_on_a_display_string():
    """No comparison or prefix test of a display field (convention, source, reason, library, label) in the package."""
    offenders = []
    for path in sorted((ROOT / "loraplus").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "startswith", "endswith"):
                target = node.func.value
                if isinstance(target, ast.Attribute) and target.attr in _DISPLAY_FIELDS - {"name"}:
                    offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                attrs = [s.attr for s in sides if isinstance(s, ast.Attribute)]
                consts = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
                if consts and any(a in _DISPLAY_FIELDS - {"name"} for a in attrs):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def _vocabulary() -> frozenset[str]:
    """Every string a method, phase or role is spelled as: what must not appear as a literal in a comparison."""
    from loraplus._find_lr import Phase
    from loraplus._pairs._methods import METHODS

    return frozenset({m.name for m in METHODS} | {p.value for p in Phase} | {r.value for r in Role})


#: Names (a variable, an attribute, a group key) that hold a method, phase or role (or a side: A or B).
_WATCHED = re.compile(r"(^|_)(method|phase|role|side)$")


def _watched(node: ast.expr) -> bool:
    """``method``, ``pr.phase``, ``a_role``, ``g["role"]``, ``g.get("role")``."""
    if isinstance(node, ast.Name):
        return bool(_WATCHED.search(node.id))
    if isinstance(node, ast.Attribute):
        return bool(_WATCHED.search(node.attr))
    key = None
    if isinstance(node, ast.Subscript):
        key = node.slice
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        key = node.args[0]
    return isinstance(key, ast.Constant) and isinstance(key.value, str) and bool(_WATCHED.search(key.value))


def _spelled(node: ast.expr) -> list[str]:
    """The string literals ``node`` spells out: a literal, or a tuple/list/set of literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for elt in node.elts for s in _spelled(elt)]
    return []


def _member_value(node: ast.expr) -> bool:
    """``Role.B.value`` or ``Phase.RANGE.value``: an enum member turned back into its string."""
    return (isinstance(node, ast.Attribute) and node.attr == "value" and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name) and node.value.value.id in ("Role", "Phase"))


def string_comparisons_of_a_vocabulary(source: str) -> list[int]:
    """Lines where a method, phase or role is compared (``==``, ``!=``, ``in``, ``not in``) to its spelling.

    Two ways to be caught: one side is a watched name (``method``, ``phase``, ``role``, ``side``,
    ``g["role"]``, ``g.get("role")``) and another spells a string; or a side spells one of the
    vocabulary's own strings (``"lorafa"``, ``"confirm"``, ``"B"``, ``Role.B.value``) whatever it is
    compared with. Compare the records and enum members instead (``method.freezes_a``, ``p.phase is
    Phase.RANGE``, ``group_role(g) is Role.B``).
    """
    vocabulary = _vocabulary()
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or not all(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        sides = [node.left, *node.comparators]
        spelled = [s for side in sides for s in _spelled(side)]
        if any(_member_value(side) for side in sides) or any(s in vocabulary for s in spelled) or (
                spelled and any(_watched(side) for side in sides)):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("old", [
    'if method == "lorafa":\n    pass',  # _precondition.py before the method records
    'rank_left = (side == "A") != bucket.transposed',
    'a = [g for g in groups if g.get("role") == Role.A.value]',  # per_group before group_role
    'if g.get("role") == "B": pass',
    'ok = role in ("A", "B")',
    'x = [p for p in points if p.phase == "range"]',  # find_lr before Phase
    'x = kind != "confirm"',
    'x = g["role"] not in {"embedding_A", "embedding_B"}',
])
def test_the_vocabulary_rule_catches_the_old_patterns(old):
    assert string_comparisons_of_a_vocabulary(old) == [1]


@pytest.mark.parametrize("fine", [
    "if method.freezes_a: pass",
    "x = p.phase is Phase.RANGE",
    "x = group_role(g) is Role.B",
    'x = name == "head.weight"',
    "x = key == role.value",
])
def test_the_vocabulary_rule_lets_records_and_members_through(fine):
    assert string_comparisons_of_a_vocabulary(fine) == []


def test_no_code_compares_a_method_phase_or_role_to_a_string():
    """Methods, probe phases and roles are records and enum members: no branch on their spelling."""
    offenders = []
    for path in sorted((ROOT / "loraplus").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        offenders += [f"{rel}:{line}" for line in string_comparisons_of_a_vocabulary(text)]
    assert not offenders, offenders


# ----------------------------------------------------------------------------------------------- package shape


def _package_imports() -> dict[str, set[str]]:
    """``{module: modules of loraplus it imports at module level}``, read from the source."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "loraplus").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        deps: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            nodes = [node] if not isinstance(node, (ast.If, ast.Try)) else list(ast.walk(node))
            for sub in nodes:
                if isinstance(sub, ast.ImportFrom) and sub.level:
                    base = package[: len(package) - sub.level + 1]
                    target = ".".join(base + ([sub.module] if sub.module else []))
                    deps.add(target)
                    for alias in sub.names:  # `from . import testing` imports a submodule
                        candidate = f"{target}.{alias.name}"
                        if (ROOT / Path(*candidate.split("."))).is_dir() or (
                                ROOT / Path(*candidate.split(".")).with_suffix(".py")).exists():
                            deps.add(candidate)
        graph[name] = {d for d in deps if d != name}
    return graph


def test_the_package_has_no_import_circles():
    graph = _package_imports()
    assert "loraplus._layouts._match" in graph and graph["loraplus._labels._label"]
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            # a package's __init__ importing its own submodules is not a circle
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1 and not node.startswith(dep + "."):
                cycle.extend(stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycle, cycle


def test_import_loraplus_does_not_import_the_demo():
    import subprocess
    import sys

    code = "import sys, loraplus; print(sorted(m for m in sys.modules if m.startswith('loraplus._demo')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_factor_whose_partner_is_tied_gets_a_warning_that_says_so():
    first, second = LoraLinear(d=4, r=4), LoraLinear(d=4, r=4)
    second.lora_A["default"].weight = first.lora_B["default"].weight  # one tensor shared by two layers
    model = nn.Sequential(first, second)
    with pytest.warns(UserWarning, match=r"tied to '0.lora_B.default.weight'") as caught:
        loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3)
    assert not any("check that the other factor is trainable" in str(w.message) for w in caught)
    found = loraplus.pairs(model)
    assert [p.layer for p in found] == ["0"]
    (u,) = found.unpaired
    assert u.name == "1.lora_B.default.weight" and u.why is loraplus._pairs._pairs.Why.TIED
