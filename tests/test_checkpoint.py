"""Checkpoint and resume: bitwise-identical continuation in a new process, and checked loading.

The resumed half runs in a fresh Python process (``python tests/test_checkpoint.py resume …``),
so nothing but the saved files carries over: model weights, optimizer state (with its LoRA+
groups) and scheduler state.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import loraplus
from loraplus.testing import build_model, tiny_lora_model

REPO = Path(__file__).resolve().parents[1]
K, M = 3, 4  # steps before the checkpoint, steps after it

CONFIGS: dict[str, dict[str, Any]] = {
    "AdamW+OneCycleLR": {"cls": "AdamW", "kwargs": {"weight_decay": 0.01}, "sched": "onecycle"},
    "SGD-nesterov+StepLR": {"cls": "SGD", "kwargs": {"momentum": 0.9, "nesterov": True}, "sched": "step"},
    "Adafactor+LambdaLR": {"cls": "Adafactor", "kwargs": {}, "sched": "lambda"},
    # min_8bit_size=1: the tiny factors really get 8-bit state (packed by bnb into a nested dict)
    "bnb.AdamW8bit+StepLR": {"cls": "bnb.AdamW8bit", "kwargs": {"min_8bit_size": 1}, "sched": "step"},
}


def optimizer_class(name: str) -> Any:
    if name.startswith("bnb."):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name[4:])
    return getattr(torch.optim, name)


def _warmup(t: int) -> float:
    return min(1.0, (t + 1) / 3)


def build(config: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Model, LoRA+ optimizer and scheduler; ``seed`` only sets the initial weights."""
    spec = CONFIGS[config]
    model = tiny_lora_model(d=16, r=4, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 7)
        for layer in model.layers:
            layer.lora_B["default"].weight.normal_(0, 0.1, generator=gen)
    cls = optimizer_class(spec["cls"])
    opt = loraplus.LoraPlus(cls, model, ratio=8, lr=1e-2, **spec["kwargs"])
    if spec["sched"] == "onecycle":
        sched: Any = S.OneCycleLR(opt, max_lr=loraplus.scheduler_bounds(opt, 2e-2), total_steps=K + M + 1)
    elif spec["sched"] == "step":
        sched = S.StepLR(opt, step_size=2, gamma=0.5)
    else:
        sched = S.LambdaLR(opt, _warmup)
    return model, opt, sched


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: range) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(1000 + t)  # the batch depends on the global step only
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def resume(config: str, checkpoint: str, out: str) -> None:
    """The new process: a fresh model (other initial weights), load everything, continue."""
    torch.set_num_threads(1)
    model, opt, sched = build(config, seed=123)
    ckpt = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(ckpt["model"])
    loraplus.load_optimizer_state(opt, ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    train(model, opt, sched, range(K, K + M))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out)


def _assert_same_state(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], dict[str, Any], Path]]:
    """For every config: the uninterrupted run, and the run resumed in ONE new process (torch imports once)."""
    tmp = tmp_path_factory.mktemp("resume")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threading as the resumed process
    try:
        finals = {}
        for i, config in enumerate(CONFIGS):
            model, opt, sched = build(config, seed=0)
            train(model, opt, sched, range(K))
            ckpt = tmp / f"ckpt{i}.pt"
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, ckpt
            )
            train(model, opt, sched, range(K, K + M))  # the uninterrupted run
            finals[config] = ({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    finally:
        torch.set_num_threads(before)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    jobs = [
        arg for i, config in enumerate(CONFIGS) for arg in (config, str(tmp / f"ckpt{i}.pt"), str(tmp / f"out{i}.pt"))
    ]
    proc = subprocess.run(
        [sys.executable, __file__, "resume", *jobs], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        config: (finals[config][0], torch.load(tmp / f"out{i}.pt", weights_only=True), finals[config][1])
        for i, config in enumerate(CONFIGS)
    }


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_in_a_new_process_is_bitwise_identical(config: str, runs: dict) -> None:
    uninterrupted, resumed, ckpt = runs[config]
    saved_groups = torch.load(ckpt, weights_only=True)["optimizer"]["param_groups"]
    assert [g["name"] for g in saved_groups] == ["A", "B", "other", "other.no_decay"]
    assert all(g["param_names"] for g in saved_groups), "param_names travel with the checkpoint"
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), f"{name} differs after resume"
    _assert_same_state(resumed["optimizer"], uninterrupted["optimizer"], "optimizer")
    lrs = [g["lr"] for g in resumed["optimizer"]["param_groups"]]
    assert lrs[1] == pytest.approx(8 * lrs[0]), "the LoRA+ ratio survives the resume"
    b = "layers.0.lora_B.default.weight"
    start = build(config, seed=123)[0].state_dict()[b]
    assert not torch.equal(resumed["model"][b], start), "the resumed process really trained"


# ------------------------------------------------------------------------- checked loading


def _stepped(model: nn.Module, cls: Any = torch.optim.AdamW, **kw: Any) -> torch.optim.Optimizer:
    opt = loraplus.LoraPlus(cls, model, ratio=8, lr=1e-3, **kw)
    x = torch.randn(2, model.layers[0].base_layer.in_features)
    model(x).square().sum().backward()
    opt.step()
    return opt


def _b_nonzero(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_B["default"].weight.fill_(0.1)
    return model


def test_load_state_dict_accepts_its_own_state_and_restores_it() -> None:
    model = _b_nonzero(tiny_lora_model())
    saved = copy.deepcopy(_stepped(model).state_dict())
    fresh = loraplus.LoraPlus(torch.optim.AdamW, copy.deepcopy(model), ratio=8, lr=1e-3)
    loraplus.load_optimizer_state(fresh, saved)
    _assert_same_state(fresh.state_dict(), saved, "optimizer")


@pytest.mark.parametrize(
    ("cls", "kw", "field"),
    [(torch.optim.AdamW, {}, "exp_avg"), ("bnb.AdamW8bit", {"min_8bit_size": 1}, "state1")],
    ids=["AdamW", "bnb.AdamW8bit"],
)
def test_other_lora_rank_torch_loads_silently_loraplus_refuses(cls: Any, kw: dict, field: str) -> None:
    cls = optimizer_class(cls) if isinstance(cls, str) else cls
    saved = _stepped(_b_nonzero(tiny_lora_model(r=2)), cls, **kw).state_dict()
    plain = loraplus.LoraPlus(cls, tiny_lora_model(r=4), ratio=8, lr=1e-3, **kw)
    plain.load_state_dict(saved)  # the trap: same names and counts, torch says nothing
    target = loraplus.LoraPlus(cls, tiny_lora_model(r=4), ratio=8, lr=1e-3, **kw)
    with pytest.raises(
        loraplus.LoraPlusError,
        match=rf"'layers.0.lora_A.default.weight' has shape \(4, 8\) but its saved '{field}' has shape \(2, 8\)",
    ):
        loraplus.load_optimizer_state(target, saved)
    assert not target.state, "nothing is loaded when the check fails"


def _peft_model(adapter: str) -> nn.Module:
    layer = {"conv": "peft", "d_in": 4, "d_out": 4, "r": 2, "adapters": [adapter], "lora_bias": False}
    return build_model([layer, dict(layer)], head=False, norm=False, frozen_extra=False).model


def test_other_adapter_names_torch_loads_silently_loraplus_refuses() -> None:
    saved = loraplus.LoraPlus(torch.optim.AdamW, _peft_model("default"), lr=1e-3).state_dict()
    target = loraplus.LoraPlus(torch.optim.AdamW, _peft_model("task_x"), lr=1e-3)
    copy.deepcopy(target).load_state_dict(saved)  # the trap
    with pytest.raises(
        loraplus.LoraPlusError,
        match=r"only names differ: saved 'layers.0.lora_A.default.weight', current 'layers.0.lora_A.task_x.weight' "
        r"\(4 names\)",
    ):
        loraplus.load_optimizer_state(target, saved)


def test_more_layers_is_a_clear_count_mismatch() -> None:
    saved = loraplus.LoraPlus(torch.optim.AdamW, tiny_lora_model(layers=2), lr=1e-3).state_dict()
    target = loraplus.LoraPlus(torch.optim.AdamW, tiny_lora_model(layers=3), lr=1e-3)
    with pytest.raises(
        loraplus.LoraPlusError, match=r"group 0 \('A'\): the checkpoint has 2 parameters, the optimizer 3"
    ):
        loraplus.load_optimizer_state(target, saved)


def test_plain_optimizer_checkpoint_is_a_group_count_mismatch() -> None:
    model = tiny_lora_model()
    saved = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).state_dict()
    target = loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    with pytest.raises(
        loraplus.LoraPlusError,
        match=r"checkpoint has 1 param groups \[\?: 8\] "
        r"but the optimizer has 4 \[A: 2, B: 2, other: 1, other.no_decay: 3\]",
    ):
        loraplus.load_optimizer_state(target, saved)


def test_role_mismatch_is_reported() -> None:
    model = tiny_lora_model()
    saved = copy.deepcopy(loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3).state_dict())
    saved["param_groups"][1]["role"] = "A"
    with pytest.raises(loraplus.LoraPlusError, match=r"group 1 \('B'\): saved role 'A', current role 'B'"):
        loraplus.load_optimizer_state(loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3), saved)


def test_wrapper_prefixes_do_not_count_as_a_mismatch() -> None:
    """A checkpoint saved under DDP (module.) or torch.compile (_orig_mod.) loads into the bare model."""
    model = _b_nonzero(tiny_lora_model())
    wrapped = nn.Module()
    wrapped.module = model
    saved = _stepped(model).state_dict()
    opt_wrapped = loraplus.LoraPlus(torch.optim.AdamW, wrapped, ratio=8, lr=1e-3)
    assert opt_wrapped.param_groups[0]["param_names"][0].startswith("module.")
    loraplus.load_optimizer_state(opt_wrapped, saved)
    compiled = torch.compile(model)
    loraplus.load_optimizer_state(loraplus.LoraPlus(torch.optim.AdamW, compiled, ratio=8, lr=1e-3), saved)


# ------------------------------------------------------------------------- renamed parameters


class _QV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.v, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.q(x)) * self.v(x))


def _peft_qv(adapter: str) -> nn.Module:
    """A real PEFT model whose LoRA adapter is called ``adapter`` (same seed: same weights)."""
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(_QV(), peft.LoraConfig(r=2, target_modules=["q", "v"]), adapter_name=adapter)


def _qv_step(model: nn.Module, opt: torch.optim.Optimizer, t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_renamed_adapter_says_only_names_differ_and_loads_with_rename() -> None:
    """PEFT adapter 'default' saved, the same model with adapter 'sft' resumes: refused with the rename that
    loads it; loaded with it, every parameter gets the state its old self had, and training continues exactly."""
    old = _peft_qv("default")
    old_opt = loraplus.LoraPlus(torch.optim.AdamW, old, ratio=8, lr=1e-2, weight_decay=0.01)
    for t in range(3):
        _qv_step(old, old_opt, t)
    saved = copy.deepcopy(old_opt.state_dict())
    as_saved = {n: {k: v.clone() for k, v in old_opt.state[p].items()} for n, p in old.named_parameters()
                if p in old_opt.state}  # fmt: skip
    assert len(as_saved) == 4  # q and v, A and B: the state to move

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        new = _peft_qv("sft")
        with torch.no_grad():  # the trained weights, under the new names (the test renames them itself)
            for n, p in old.named_parameters():
                new.get_parameter(n.replace(".default.", ".sft.")).copy_(p)
        return new, loraplus.LoraPlus(torch.optim.AdamW, new, ratio=8, lr=1e-2, weight_decay=0.01)

    new, new_opt = fresh()
    with pytest.raises(
        loraplus.LoraPlusError,
        match=r"only names differ: saved 'base_model.model.q.lora_A.default.weight', current "
        r"'base_model.model.q.lora_A.sft.weight' \(4 names\); .*rename=\{'default': 'sft'\}",
    ):
        loraplus.load_optimizer_state(new_opt, saved)
    assert not new_opt.state, "nothing is loaded when the check fails"

    for rename in ({"default": "sft"}, lambda name: name.replace(".default.", ".sft.")):
        new, new_opt = fresh()
        loraplus.load_optimizer_state(new_opt, saved, rename=rename)
        for name, entry in as_saved.items():
            got = new_opt.state[new.get_parameter(name.replace(".default.", ".sft."))]
            assert got.keys() == entry.keys()
            for key, value in entry.items():
                assert torch.equal(got[key], value), (name, key)
        truth = {id(p): n for n, p in new.named_parameters()}
        for g in new_opt.param_groups:  # the optimizer's names are the new ones, each on its parameter
            assert g["param_names"] == [truth[id(p)] for p in g["params"]]
        assert saved["param_groups"][0]["param_names"][0].endswith(".default.weight")  # the input is not modified

    reference = copy.deepcopy((old, old_opt))
    _qv_step(reference[0], reference[1], 3)
    _qv_step(new, new_opt, 3)
    for n, p in reference[0].named_parameters():
        assert torch.equal(new.get_parameter(n.replace(".default.", ".sft.")), p), n


def test_names_differing_beyond_one_segment_suggest_a_function() -> None:
    model = _b_nonzero(tiny_lora_model())
    saved = copy.deepcopy(_stepped(model).state_dict())
    outer = nn.Module()
    outer.inner = copy.deepcopy(model)  # not a wrapper prefix: every name gains a segment
    target = loraplus.LoraPlus(torch.optim.AdamW, outer, ratio=8, lr=1e-3)
    with pytest.raises(
        loraplus.LoraPlusError,
        match=r"only names differ: saved 'layers.0.lora_A.default.weight', current "
        r"'inner.layers.0.lora_A.default.weight' \(8 names\).*rename=<a function from each saved name",
    ):
        loraplus.load_optimizer_state(target, saved)
    loraplus.load_optimizer_state(target, saved, rename=lambda name: "inner." + name)
    _assert_same_state(target.state_dict()["state"], saved["state"], "state")


def test_names_and_shapes_both_differing_is_not_a_renaming() -> None:
    saved = _stepped(_b_nonzero(tiny_lora_model(r=2))).state_dict()
    outer = nn.Module()
    outer.inner = tiny_lora_model(r=4)
    target = loraplus.LoraPlus(torch.optim.AdamW, outer, ratio=8, lr=1e-3)
    with pytest.raises(loraplus.LoraPlusError, match="saved for another model") as err:
        loraplus.load_optimizer_state(target, saved)
    assert "only names differ" not in str(err.value)
    with pytest.raises(loraplus.LoraPlusError, match=r"has shape \(4, 8\) but its saved 'exp_avg' has shape \(2, 8\)"):
        loraplus.load_optimizer_state(target, saved, rename=lambda name: "inner." + name)



def test_a_segment_map_replaces_whole_segments_only() -> None:
    """Adapter 'a' renamed to 'b': {'a': 'b'} must not touch the 'a' inside 'layers' or 'lora_A'."""
    saved = loraplus.LoraPlus(torch.optim.AdamW, _peft_model("a"), lr=1e-3).state_dict()
    target = loraplus.LoraPlus(torch.optim.AdamW, _peft_model("b"), lr=1e-3)
    loraplus.load_optimizer_state(target, saved, rename={"a": "b"})
    assert target.param_groups[0]["param_names"] == ["layers.0.lora_A.b.weight", "layers.1.lora_A.b.weight"]


def test_bad_rename_arguments_are_refused() -> None:
    saved = loraplus.LoraPlus(torch.optim.AdamW, _peft_model("default"), lr=1e-3).state_dict()
    target = loraplus.LoraPlus(torch.optim.AdamW, _peft_model("task_x"), lr=1e-3)
    with pytest.raises(loraplus.LoraPlusError, match=r"only names differ, even after rename=: saved \(renamed\) "
                       r"'layers.0.lora_A.task_y.weight', current 'layers.0.lora_A.task_x.weight'"):  # fmt: skip
        loraplus.load_optimizer_state(target, saved, rename={"default": "task_y"})
    with pytest.raises(loraplus.LoraPlusError, match=r"single name segments .* got 'lora_A.default': 'lora_A.x'"):
        loraplus.load_optimizer_state(target, saved, rename={"lora_A.default": "lora_A.x"})
    with pytest.raises(loraplus.LoraPlusError, match="rename must be a dict of name segments .* got str"):
        loraplus.load_optimizer_state(target, saved, rename="task_x")  # type: ignore[arg-type]
    with pytest.raises(loraplus.LoraPlusError, match=r"rename\('layers.0.lora_A.default.weight'\) returned NoneType"):
        loraplus.load_optimizer_state(target, saved, rename=lambda name: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(KeyError):  # the caller's own error, unchanged
        loraplus.load_optimizer_state(target, saved, rename=lambda name: {}[name])
    unnamed = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "param_names"} for g in saved["param_groups"]]}
    with pytest.raises(loraplus.LoraPlusError, match="carry no param_names"):
        loraplus.load_optimizer_state(target, unnamed, rename={"default": "task_x"})
    assert not target.state


@pytest.mark.parametrize("bad", [{}, {"model": {}}, [1, 2], None])
def test_not_an_optimizer_state_dict(bad: Any) -> None:
    opt = loraplus.LoraPlus(torch.optim.AdamW, tiny_lora_model(), lr=1e-3)
    with pytest.raises(loraplus.LoraPlusError, match="expected an optimizer state dict"):
        loraplus.load_optimizer_state(opt, bad)


def test_not_an_optimizer() -> None:
    with pytest.raises(loraplus.LoraPlusError, match="expected a torch optimizer"):
        loraplus.load_optimizer_state(functools.partial(print), {"state": {}, "param_groups": []})


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "resume":
    args = sys.argv[2:]  # (config, checkpoint, out) triples
    for j in range(0, len(args), 3):
        resume(*args[j : j + 3])
