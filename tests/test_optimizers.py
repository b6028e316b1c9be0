"""The optimizer matrix: every optimizer LoRA+ claims to support gives each group its own lr.

For each optimizer, one step from identical state with ratio=1 and ratio=λ: the A factors and
every other parameter move exactly as in the ratio=1 run, and the B factors move λ times as far
(every optimizer here has a first-step update proportional to its learning rate, see
``Case.why``). A second test compares LoraPlus against the same optimizer built with
hand-written param groups for several steps (the reference implementation).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lion_pytorch
import pytest
import pytorch_optimizer
import schedulefree
import torch
import torch.distributed as dist
import torchao.optim
from _ranks import Rendezvous, join, leave, run_script
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from transformers.optimization import Adafactor as HFAdafactor

import loraplus
from loraplus import Role
from loraplus.testing import assert_loraplus_groups, tiny_lora_model

LR = 1e-3
RATIO = 4.0
WD = 0.01
# d*r = 4096 values per factor, a multiple of 256: big enough that bitsandbytes and torchao
# really keep 8-/4-bit states for the A and B factors (both skip tensors under 4096 values).
# A and B share one shape, so torchao (which compiles its step once per shape) compiles once.
D, R = 64, 64


def truth(model: nn.Module) -> dict[str, Any]:
    """tiny_lora_model's ground truth, from how it is built: PEFT-named factors, a LayerNorm, a head."""
    roles = {
        n: Role.A if ".lora_A." in n else Role.B if ".lora_B." in n else Role.OTHER
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return {"expected_roles": roles, "no_decay": {n for n in roles if n.startswith("norm.") or n == "head.bias"}}


def make_model(seed: int = 0, trainable: str = "all") -> nn.Module:
    """tiny_lora_model with B drawn at random (with PEFT's B=0 the A gradient would be zero)."""
    model = tiny_lora_model(d=D, r=R, layers=2, n_out=3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.layers:
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
    for name, p in model.named_parameters():
        if trainable == "matrices" and p.ndim != 2:  # Muon takes 2-D parameters only
            p.requires_grad_(False)
        if trainable == "adapters" and "lora_" not in name:
            p.requires_grad_(False)
    return model


def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, D, generator=gen)
    y = torch.randn(8, 3, generator=gen)
    return nn.functional.mse_loss(model(x), y)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory):
    """A single-process gloo group for ZeroRedundancyOptimizer (a ``file://`` store: no port to take)."""
    if dist.is_initialized():
        yield
        return
    rendezvous = Rendezvous.fresh(tmp_path_factory.mktemp("zero_single"), world_size=1)
    join(0, rendezvous)
    try:
        yield
    finally:
        leave(0, rendezvous, ok=True)


def _train_mode(opt: Any) -> None:
    opt.train()


@dataclass(frozen=True)
class Case:
    id: str
    factory: Callable[..., Any]
    why: str  # why the first-step update is proportional to the group's lr
    kwargs: dict[str, Any] = field(default_factory=dict)
    before_step: Callable[[Any], None] | None = None
    trainable: str = "all"  # or "matrices" (2-D only) or "adapters" (A and B only)
    needs_process_group: bool = False
    rtol: float = 1e-4


ADAM_LIKE = "first step: lr * m/(sqrt(v)+eps) with m, v independent of lr; decoupled decay lr*wd*p"
CASES = [
    Case("SGD", torch.optim.SGD, "lr * (g + wd p); momentum buffer starts at g", {"momentum": 0.9}),
    Case("SGD-nesterov", torch.optim.SGD, "lr * (g + 0.9 g)", {"momentum": 0.9, "nesterov": True}),
    Case("Adam", torch.optim.Adam, ADAM_LIKE),
    Case("AdamW-foreach", torch.optim.AdamW, ADAM_LIKE, {"foreach": True}),
    Case("AdamW-for-loop", torch.optim.AdamW, ADAM_LIKE, {"foreach": False}),
    Case("AdamW-fused", torch.optim.AdamW, ADAM_LIKE, {"fused": True}),
    Case("AdamW-amsgrad", torch.optim.AdamW, ADAM_LIKE, {"amsgrad": True}),
    Case("Adamax", torch.optim.Adamax, "lr/(1-beta1) * m/u"),
    Case("NAdam", torch.optim.NAdam, "momentum schedule mu_t does not depend on lr"),
    Case("RAdam", torch.optim.RAdam, "rho_t <= 5 in the first steps: un-rectified lr * m_hat"),
    Case("RMSprop", torch.optim.RMSprop, "lr * g/sqrt(v)", {"momentum": 0.5}),
    Case("Rprop", torch.optim.Rprop, "step sizes start at lr: lr * sign(g)"),
    Case("ASGD", torch.optim.ASGD, "eta starts at lr: p(1 - lambd lr) - lr g"),
    Case("Adagrad", torch.optim.Adagrad, "lr * g/sqrt(sum g^2)"),
    Case(
        "Adadelta",
        torch.optim.Adadelta,
        "lr * sqrt(delta+eps)/sqrt(v+eps) * g",
    ),
    Case("Adafactor", torch.optim.Adafactor, "rho_t = min(lr, 1/sqrt(t)) = lr while lr <= 1"),
    Case("Muon", torch.optim.Muon, "lr * adjust(shape) * NewtonSchulz(g)", trainable="matrices"),
    Case(
        "ZeroRedundancyOptimizer",
        functools.partial(ZeroRedundancyOptimizer, optimizer_class=torch.optim.AdamW),
        ADAM_LIKE + " (local AdamW keeps the groups)",
        needs_process_group=True,
    ),
    Case("bnb.AdamW8bit", bnb.optim.AdamW8bit, ADAM_LIKE + "; 8-bit states are quantised identically"),
    Case("bnb.Adam8bit", bnb.optim.Adam8bit, ADAM_LIKE + "; 8-bit states are quantised identically"),
    Case("bnb.Lion8bit", bnb.optim.Lion8bit, "lr * sign(...)"),
    Case("torchao.AdamW8bit", torchao.optim.AdamW8bit, ADAM_LIKE + "; 8-bit states", trainable="adapters"),
    Case("torchao.AdamW4bit", torchao.optim.AdamW4bit, ADAM_LIKE + "; 4-bit states", trainable="adapters"),
    Case(
        "schedulefree.AdamWScheduleFree",
        schedulefree.AdamWScheduleFree,
        "first step: y = z - lr g/sqrt(v)",
        before_step=_train_mode,
    ),
    Case("lion_pytorch.Lion", lion_pytorch.Lion, "lr * sign(...)"),
    Case(
        "transformers.Adafactor",
        HFAdafactor,
        "relative_step=False: lr * RMS(p) * clipped factored update",
        {"relative_step": False, "scale_parameter": True, "warmup_init": False},
    ),
    Case("pytorch_optimizer.Adan", pytorch_optimizer.Adan, ADAM_LIKE),
    Case("pytorch_optimizer.CAME", pytorch_optimizer.CAME, "lr * confidence-scaled update, update independent of lr"),
    Case(
        "pytorch_optimizer.Lamb",
        pytorch_optimizer.Lamb,
        "lr * trust_ratio * adam_update, trust ratio independent of lr",
    ),
]


def _build(case: Case, model: nn.Module, ratio: float) -> Any:
    return loraplus.LoraPlus(case.factory, model, ratio=ratio, lr=LR, weight_decay=WD, **case.kwargs)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _one_step_deltas(case: Case, ratio: float) -> tuple[dict[str, torch.Tensor], Any, nn.Module]:
    model = make_model(trainable=case.trainable)
    opt = _build(case, model, ratio)
    assert_loraplus_groups(opt, model, ratio=ratio, lr=LR, **truth(model))
    if case.before_step:
        case.before_step(opt)
    before = _snapshot(model)
    opt.zero_grad()
    loss_fn(model, 0).backward()
    opt.step()
    after = _snapshot(model)
    return {n: after[n] - before[n] for n in before}, opt, model


def _use_process_group(case: Case, request: pytest.FixtureRequest) -> None:
    if case.needs_process_group:
        request.getfixturevalue("process_group")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_first_step_update_scales_with_each_groups_lr(case: Case, request: pytest.FixtureRequest) -> None:
    _use_process_group(case, request)
    base, _, _ = _one_step_deltas(case, 1.0)
    plus, opt, model = _one_step_deltas(case, RATIO)
    roles = loraplus.classify(model)
    assert {r for r in roles.values()} >= {Role.A, Role.B}
    for name, role in roles.items():
        assert base[name].abs().max() > 0, f"{name} did not move: the check would be vacuous"
        if role is Role.B:
            # B moves λ times as far as with ratio=1 ...
            torch.testing.assert_close(plus[name], RATIO * base[name], rtol=case.rtol, atol=1e-7)
            assert not torch.allclose(plus[name], base[name]), name
        else:
            # ... and everything else exactly as with ratio=1.
            torch.testing.assert_close(plus[name], base[name], rtol=case.rtol, atol=1e-8)


def _hand_written_groups(model: nn.Module, ratio: float) -> list[dict[str, Any]]:
    """The groups a user would write by hand for tiny_lora_model (the reference)."""
    named = dict(model.named_parameters())

    def pick(names: list[str]) -> list[nn.Parameter]:
        return [named[n] for n in names if named[n].requires_grad]

    a = [f"layers.{i}.lora_A.default.weight" for i in range(2)]
    b = [f"layers.{i}.lora_B.default.weight" for i in range(2)]
    groups = [
        {"params": pick(a), "lr": LR, "weight_decay": WD},
        {"params": pick(b), "lr": ratio * LR, "weight_decay": WD},
        {"params": pick(["head.weight"]), "lr": LR, "weight_decay": WD},
        {"params": pick(["norm.weight", "norm.bias", "head.bias"]), "lr": LR, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_hand_written_groups_over_three_steps(case: Case, request: pytest.FixtureRequest) -> None:
    _use_process_group(case, request)
    ours_model = make_model(trainable=case.trainable)
    ref_model = make_model(trainable=case.trainable)
    ours = _build(case, ours_model, RATIO)
    ref = case.factory(_hand_written_groups(ref_model, RATIO), lr=LR, **case.kwargs)
    for opt in (ours, ref):
        if case.before_step:
            case.before_step(opt)
    for step in range(3):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss_fn(model, step).backward()
            opt.step()
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


_ZERO_RANK = """
import sys, torch, torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
import loraplus
from loraplus.testing import tiny_lora_model
from _ranks import Rendezvous, join, leave

rank, folder = int(sys.argv[1]), sys.argv[2]
rendezvous = Rendezvous(sys.argv[3], world_size=2, timeout_s=60)
torch.set_num_threads(1)


def work():  # a function, so the optimizer (which holds the process group) is freed before leave()
    inputs = torch.load(f"{folder}/inputs.pt", weights_only=True)
    model = tiny_lora_model(d=64, r=64, layers=2, n_out=3)
    model.load_state_dict(inputs["model"])
    opt = loraplus.LoraPlus(
        ZeroRedundancyOptimizer, model, ratio=4.0, lr=1e-3, weight_decay=0.01, optimizer_class=torch.optim.AdamW
    )
    local = [len(g["params"]) for g in opt.optim.param_groups]
    local_names = [len(g["param_names"]) for g in opt.optim.param_groups]
    for x, y in inputs["batches"]:  # same batch on both ranks: no gradient averaging needed
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.consolidate_state_dict(to=0)
    full = opt.state_dict() if rank == 0 else None
    torch.save(
        {"model": model.state_dict(), "local": local, "local_names": local_names, "full": full},
        f"{folder}/rank{rank}.pt",
    )


join(rank, rendezvous)
ok = False
try:
    work()
    ok = True
finally:
    leave(rank, rendezvous, ok=ok)
"""


def test_zero_redundancy_optimizer_on_two_ranks_matches_single_process(tmp_path: Path) -> None:
    """Two gloo ranks on 127.0.0.1, each owning part of every LoRA+ group: same result as one AdamW."""
    model = make_model()
    batches = []
    for step in range(2):
        gen = torch.Generator().manual_seed(100 + step)
        batches.append((torch.randn(8, D, generator=gen), torch.randn(8, 3, generator=gen)))
    torch.save({"model": model.state_dict(), "batches": batches}, tmp_path / "inputs.pt")
    rendezvous = Rendezvous.fresh(tmp_path)  # a file store in tmp_path: no port to take
    run_script(_ZERO_RANK, (str(tmp_path), rendezvous.folder), world_size=2, deadline_s=240)

    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=RATIO, lr=LR, weight_decay=WD)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["local"] != [len(g["params"]) for g in opt.param_groups], "the groups really were sharded"
    assert [a + b for a, b in zip(ranks[0]["local"], ranks[1]["local"])] == [len(g["params"]) for g in opt.param_groups]
    for rank in ranks:
        for name, value in model.state_dict().items():
            torch.testing.assert_close(rank["model"][name], value, rtol=1e-6, atol=1e-7, msg=f"{name} differs")
    full = ranks[0]["full"]["param_groups"]
    meta = lambda groups: [(g["name"], g["role"], g["lr"]) for g in groups]  # noqa: E731
    assert meta(full) == meta(opt.param_groups)
    assert [g["param_names"] for g in full] == [g["param_names"] for g in opt.param_groups]
    # quirk (documented): each rank's local optimizer holds a shard of the params but the full param_names
    assert ranks[1]["local_names"] == [len(g["param_names"]) for g in opt.param_groups] != ranks[1]["local"]


def test_quantised_optimizers_really_keep_low_bit_state() -> None:
    """The model is big enough that bitsandbytes/torchao quantise A and B states (else the test above proves less)."""
    for factory, kind in (
        (bnb.optim.AdamW8bit, "bnb"),
        (torchao.optim.AdamW8bit, "ao8"),
        (torchao.optim.AdamW4bit, "ao4"),
    ):
        model = make_model(trainable="adapters")
        opt = loraplus.LoraPlus(factory, model, ratio=RATIO, lr=LR, weight_decay=WD)
        loss_fn(model, 0).backward()
        opt.step()
        b = model.layers[0].lora_B["default"].weight
        state = opt.state[b]
        if kind == "bnb":
            assert state["state1"].dtype == torch.uint8
        else:
            assert type(state["exp_avg"]).__name__.startswith("OptimState"), type(state["exp_avg"])


def test_schedulefree_eval_weights_keep_the_ratio() -> None:
    """AdamWScheduleFree evaluates at the averaged point x; switching to eval must keep B's λ scaling."""
    case = next(c for c in CASES if c.id == "schedulefree.AdamWScheduleFree")
    results = {}
    for ratio in (1.0, RATIO):
        model = make_model()
        opt = _build(case, model, ratio)
        opt.train()
        before = _snapshot(model)
        for step in range(1):
            opt.zero_grad()
            loss_fn(model, step).backward()
            opt.step()
        opt.eval()  # parameters now hold the averaged x
        results[ratio] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
        opt.train()
    for name, role in loraplus.classify(make_model()).items():
        want = RATIO * results[1.0][name] if role is Role.B else results[1.0][name]
        torch.testing.assert_close(results[RATIO][name], want, rtol=1e-4, atol=1e-7)


def test_schedulefree_needs_train_mode() -> None:
    """The documented requirement: call opt.train() before stepping (schedulefree raises otherwise)."""
    model = make_model()
    opt = loraplus.LoraPlus(schedulefree.AdamWScheduleFree, model, ratio=RATIO, lr=LR)
    loss_fn(model, 0).backward()
    with pytest.raises(Exception, match="train"):
        opt.step()


# ---------------------------------------------------------------------------------------- Muon


def test_muon_rejects_one_dimensional_parameters_with_context() -> None:
    with pytest.raises(loraplus.LoraPlusError, match="Muon could not be built.*2D"):
        loraplus.LoraPlus(torch.optim.Muon, make_model(), ratio=RATIO, lr=0.02)


def _muon_plus_adamw(model: nn.Module, ratio: float) -> tuple[torch.optim.Muon, torch.optim.AdamW]:
    """The documented recipe: Muon for the 2-D adapter factors, AdamW for everything else."""
    roles = loraplus.classify(model)
    on_muon = lambda name, p: p.ndim == 2 and roles[name] in (Role.A, Role.B)  # noqa: E731
    muon_groups, _ = loraplus.groups.split_groups(loraplus.param_groups(model, lr=0.02, ratio=ratio), on_muon)
    _, adamw_groups = loraplus.groups.split_groups(
        loraplus.param_groups(model, lr=3e-4, ratio=ratio, weight_decay=WD), on_muon
    )
    return torch.optim.Muon(muon_groups, lr=0.02), torch.optim.AdamW(adamw_groups, lr=3e-4)


def test_muon_with_adamw_for_the_rest_keeps_the_ratio() -> None:
    deltas = {}
    for ratio in (1.0, RATIO):
        model = make_model()
        muon, adamw = _muon_plus_adamw(model, ratio)
        assert [g["name"] for g in muon.param_groups] == ["A", "B"]
        assert [g["name"] for g in adamw.param_groups] == ["other", "other.no_decay"]
        assert {g["lr"] for g in muon.param_groups if g["role"] == "B"} == {0.02 * ratio}
        owned = [n for g in muon.param_groups + adamw.param_groups for n in g["param_names"]]
        assert sorted(owned) == sorted(loraplus.classify(model)), "every trainable parameter in exactly one optimizer"
        before = _snapshot(model)
        loss_fn(model, 0).backward()
        muon.step()
        adamw.step()
        deltas[ratio] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    for name, role in loraplus.classify(make_model()).items():
        want = RATIO * deltas[1.0][name] if role is Role.B else deltas[1.0][name]
        torch.testing.assert_close(deltas[RATIO][name], want, rtol=1e-4, atol=1e-7)


def test_split_groups_keeps_metadata_and_drops_empty_halves() -> None:
    model = make_model()
    groups = loraplus.param_groups(model, lr=1e-3, ratio=8, weight_decay=WD)
    picked, rest = loraplus.groups.split_groups(groups, lambda name, p: name.startswith("layers.0."))
    assert [g["name"] for g in picked] == ["A", "B"]
    assert [g["name"] for g in rest] == ["A", "B", "other", "other.no_decay"]
    for g in picked + rest:
        assert len(g["params"]) == len(g["param_names"]) > 0
        original = next(o for o in groups if o["name"] == g["name"])
        assert {k: v for k, v in g.items() if k not in ("params", "param_names")} == {
            k: v for k, v in original.items() if k not in ("params", "param_names")
        }
    with pytest.raises(loraplus.LoraPlusError, match="param_names"):
        loraplus.groups.split_groups([{"params": [torch.zeros(1)]}], lambda n, p: True)


def test_transformers_adafactor_with_relative_step_is_rejected_with_context() -> None:
    """Its default relative_step=True computes its own lr and refuses a manual one: LoRA+ needs relative_step=False."""
    with pytest.raises(loraplus.LoraPlusError, match="Adafactor could not be built.*relative_step"):
        loraplus.LoraPlus(HFAdafactor, make_model(), ratio=RATIO, lr=LR)


def test_supported_optimizers_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loraplus.LoraPlus(pytorch_optimizer.Adan, make_model(), ratio=RATIO, lr=LR)
        loraplus.LoraPlus(lion_pytorch.Lion, make_model(), ratio=RATIO, lr=LR)


def test_lbfgs_is_rejected() -> None:
    with pytest.raises(loraplus.LoraPlusError, match="LBFGS does not support per-parameter options"):
        loraplus.LoraPlus(torch.optim.LBFGS, make_model(), ratio=RATIO, lr=LR)


def test_cases_cover_the_claimed_matrix() -> None:
    """The docs table lists these ids; keep them in sync."""
    ids = {c.id for c in CASES}
    torch_classes = {
        "SGD",
        "Adam",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "ASGD",
        "Adagrad",
        "Adadelta",
        "Adafactor",
        "Muon",
    }
    assert torch_classes <= ids
    assert {"AdamW-foreach", "AdamW-for-loop", "AdamW-fused", "ZeroRedundancyOptimizer"} <= ids


def test_assert_loraplus_groups_accepts_float32_tensor_lrs() -> None:
    """Regression: torchao stores each group's lr as a float32 tensor; the checker compared at 1e-12."""
    model = make_model(trainable="adapters")
    opt = loraplus.LoraPlus(torchao.optim.AdamW8bit, model, ratio=RATIO, lr=LR)
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    assert_loraplus_groups(opt, model, ratio=RATIO, lr=LR, **truth(model))
    with pytest.raises(AssertionError, match=r"\(B\) has lr=.*expected 0\.004"):
        opt.param_groups[1]["lr"] = torch.tensor(LR * 3.9)
        assert_loraplus_groups(opt, model, ratio=RATIO, lr=LR, **truth(model))


@pytest.mark.parametrize(("adjust", "low", "high"), [(None, 2.5, 6.0), ("match_rms_adamw", 0.6, 1.6)])
def test_muon_shape_scaling_adds_to_the_ratio_by_default(adjust: str | None, low: float, high: float) -> None:
    """Muon's default adjust_lr_fn scales B (out x r) by sqrt(out/r) = 4 here on top of λ; match_rms_adamw does not."""
    model = tiny_lora_model(d=64, r=4, layers=1, seed=3)
    with torch.no_grad():
        model.layers[0].lora_B["default"].weight.normal_(0, 0.05)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    opt = loraplus.LoraPlus(torch.optim.Muon, model, ratio=1.0, lr=0.02, adjust_lr_fn=adjust)
    before = _snapshot(model)
    model(torch.randn(16, 64, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    opt.step()
    norm = {n: (p.detach() - before[n]).norm().item() for n, p in model.named_parameters() if p.requires_grad}
    b_over_a = norm["layers.0.lora_B.default.weight"] / norm["layers.0.lora_A.default.weight"]
    assert low < b_over_a < high, b_over_a


def _my_doc_sections() -> str:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text(encoding="utf-8")
    keep, out = False, []
    for line in page.splitlines():
        if line.startswith("## "):
            keep = line[3:] in {
                "Optimizers",
                "Schedulers",
                "Checkpoint and resume",
                "torch.compile",
                "Known traps and their fixes",
            }
        elif keep:
            out.append(line)
    return "\n".join(out)


def test_compatibility_page_names_only_tests_that_exist_and_every_optimizer_case() -> None:
    import re
    from pathlib import Path

    text = _my_doc_sections()
    tests_dir = Path(__file__).resolve().parent
    defined = set()
    for path in tests_dir.glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    cited = set(re.findall(r"`(test_\w+)", text))
    assert len(cited) > 20
    assert cited <= defined, f"the page cites tests that do not exist: {sorted(cited - defined)}"
    optimizer_section = text.split("Muon + AdamW")[0]
    for case in CASES:
        assert case.id.split(".")[-1] in optimizer_section, f"optimizer case {case.id} is not in the docs table"
