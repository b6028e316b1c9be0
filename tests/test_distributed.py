"""LoRA+ under DDP, FSDP2 (``fully_shard``) and FSDP1 (``use_orig_params=True``), CPU + gloo, 2 ranks.

One ``torch.multiprocessing`` spawn (2 gloo ranks meeting in a file store, see tests/_ranks.py) runs every wrapper
in turn; each rank saves what it saw (its groups, the local parameter shapes and types, the
groups of the other rank, the full parameters after a few steps) and the tests below compare
that with a single-process reference run in the test process. Hangs fail: the process group
has a timeout and the spawn a deadline.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _ranks import Rendezvous, join, leave, run_ranks
from torch import nn

import loraplus
from loraplus._labels._label import canonical_name
from loraplus.compat import peft_param_groups
from loraplus.testing import tiny_lora_model

WORLD = 2
STEPS = 3
LR = 1e-2
RATIO = 8.0
WEIGHT_DECAY = 0.01
WRAPPERS = ("ddp", "fsdp2", "fsdp1")
PG_TIMEOUT_S = 45  # a collective waiting longer than this raises in the worker
SPAWN_DEADLINE_S = 180  # the whole spawn (3 wrappers) is killed after this


def _model() -> nn.Module:
    """The tiny PEFT-named model, with B made non-zero so A factors get gradients from step 1."""
    model = tiny_lora_model(d=8, r=2, layers=2, n_out=2, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(8, 8, generator=gen), torch.randn(8, 2, generator=gen)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, weight_decay=WEIGHT_DECAY)


def _summary(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {
            "name": g["name"],
            "role": g["role"],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "param_names": list(g["param_names"]),
        }
        for g in opt.param_groups
    ]


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _reference() -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Single process, full batch: what every wrapper must reproduce."""
    model = _model()
    opt = _optimizer(model)
    x, y = _data()
    summary = _summary(opt)
    _train(model, opt, x, y)
    return summary, {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- worker (runs in each rank)


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(
            model,
            use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy({type(model.layers[0])}),
            device_id=torch.device("cpu"),
        )
    raise ValueError(kind)


def _full_params(kind: str, wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, unsharded, under its unwrapped name."""
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            return {canonical_name(n): p.detach().clone() for n, p in wrapped.named_parameters()}
    out = {}
    for n, p in wrapped.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[canonical_name(n)] = t.detach().clone()
    return out


def _run_wrapper(kind: str, rank: int) -> dict[str, Any]:
    wrapped = _wrap(kind, _model())
    opt = _optimizer(wrapped)
    mine = _summary(opt)
    everyone: list[Any] = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    local = {  # (type, ndim, shape of the tensor this rank holds)
        n: (type(p).__name__, p.ndim, tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape))
        for n, p in wrapped.named_parameters()
        if p.requires_grad
    }
    x, y = _data()
    half = x.shape[0] // WORLD
    rows = slice(rank * half, (rank + 1) * half)  # each rank sees its half of the reference batch
    _train(wrapped, opt, x[rows], y[rows])
    return {
        "groups": mine,
        "all_groups": everyone,
        "classify": {n: r.value for n, r in loraplus.classify(wrapped).items()},
        "local": local,
        "after_groups": _summary(opt),
        "params": _full_params(kind, wrapped),
        # the PEFT rule (``"lora_B" in name or ndim == 1`` -> B), reproduced by loraplus.compat
        "peft_rule_b": sorted(
            canonical_name(n)
            for g in peft_param_groups(wrapped, lr=LR, loraplus_lr_ratio=RATIO)
            if g["name"].startswith("groupB")
            for n in g["param_names"]
        ),
    }


def _worker(rank: int, rendezvous: Rendezvous, outdir: str) -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    join(rank, rendezvous)
    ok = True
    try:
        for kind in WRAPPERS:
            try:
                result: dict[str, Any] = _run_wrapper(kind, rank)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(outdir) / f"{kind}.rank{rank}.pt")
            if "error" in result:
                ok = False
                break  # the other rank may now be stuck in a collective; stop here
            dist.barrier()
    except BaseException:
        ok = False
        raise
    finally:
        leave(rank, rendezvous, ok=ok)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    outdir = tmp_path_factory.mktemp("dist")
    rendezvous = Rendezvous.fresh(outdir, world_size=WORLD, timeout_s=PG_TIMEOUT_S)
    run_ranks(_worker, (rendezvous, str(outdir)), world_size=WORLD, deadline_s=SPAWN_DEADLINE_S)
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in WRAPPERS:
        files = [outdir / f"{kind}.rank{r}.pt" for r in range(WORLD)]
        out[kind] = [torch.load(f, weights_only=False) if f.exists() else {"error": "no result"} for f in files]
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    return _reference()


def _ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
    return results


def _canonical(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**g, "param_names": [canonical_name(n) for n in g["param_names"]]} for g in summary]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", WRAPPERS)
def test_every_rank_builds_identical_groups(runs, kind):
    results = _ok(runs[kind])
    for rank, res in enumerate(results):
        # what the rank gathered from everyone equals what each rank built itself
        assert res["all_groups"] == [r["groups"] for r in results], f"rank {rank} saw different groups"
    assert results[0]["groups"] == results[1]["groups"]


@pytest.mark.parametrize("kind", WRAPPERS)
def test_groups_match_the_unwrapped_model(runs, reference, kind):
    ref_groups, _ = reference
    groups = _ok(runs[kind])[0]["groups"]
    # same group names, roles, lrs and weight decays, and the same parameters once wrapper
    # segments are stripped from the names
    assert _canonical(groups) == ref_groups
    by_role = {g["role"]: g["lr"] for g in groups}
    assert by_role["B"] == pytest.approx(RATIO * by_role["A"], rel=1e-12)


@pytest.mark.parametrize(
    ("kind", "prefix_segment"), [("ddp", "module"), ("fsdp2", None), ("fsdp1", "_fsdp_wrapped_module")]
)
def test_wrapper_names_are_classified_like_the_plain_model(runs, kind, prefix_segment):
    res = _ok(runs[kind])[0]
    names = [n for g in res["groups"] for n in g["param_names"]]
    if prefix_segment is None:  # FSDP2 keeps the module's own names
        assert set(names) == set(loraplus.classify(_model()))
    else:
        assert all(prefix_segment in n.split(".") for n in names), names
    plain = {n: r.value for n, r in loraplus.classify(_model()).items()}
    assert {canonical_name(n): r for n, r in res["classify"].items()} == plain


def test_fsdp2_parameters_are_dtensors_sharded_on_dim0(runs):
    res = _ok(runs["fsdp2"])
    plain = dict(_model().named_parameters())
    for _rank, r in enumerate(res):
        for name, (typ, ndim, shape) in r["local"].items():
            assert typ == "DTensor", name
            full = plain[name].shape
            assert ndim == len(full) and shape[1:] == tuple(full[1:]), (name, shape, full)
            assert shape[0] <= -(-full[0] // WORLD)  # at most ceil(n / world) rows per rank


def test_fsdp1_flat_views_do_not_change_the_roles(runs):
    """FSDP1 exposes 1-D local views; a shape rule (``ndim == 1`` -> B, as in PEFT's LoRA+)
    would then put every A factor and head weight into the B group. Roles must come from names."""
    res = _ok(runs["fsdp1"])
    for r in res:
        assert {ndim for _, ndim, _ in r["local"].values()} == {1}, "FSDP1 no longer flattens: update this test"
    # the sizes differ between ranks (each holds a slice of the flat parameter, often empty)...
    assert res[0]["local"] != res[1]["local"]
    # ...yet both ranks label every parameter as the unsharded model does
    plain = {n: r.value for n, r in loraplus.classify(_model()).items()}
    for r in res:
        assert {canonical_name(n): role for n, role in r["classify"].items()} == plain
        # a shape rule misfires here: PEFT's puts every trainable tensor (A factors, head weight) into B
        assert r["peft_rule_b"] == sorted(plain)
    for name in ("layers.0.lora_A.default.weight", "head.weight"):
        assert plain[name] != "B"
    # on the unwrapped model the same rule leaves A factors and the head weight out of B
    unwrapped_b = {n for g in peft_param_groups(_model(), lr=LR, loraplus_lr_ratio=RATIO) if g["name"].startswith("groupB") for n in g["param_names"]}
    assert "layers.0.lora_A.default.weight" not in unwrapped_b and "head.weight" not in unwrapped_b


@pytest.mark.parametrize("kind", WRAPPERS)
def test_training_matches_the_single_process_reference(runs, reference, kind):
    _, ref_params = reference
    results = _ok(runs[kind])
    for rank, res in enumerate(results):
        assert set(res["params"]) == set(ref_params)
        for name, ref in ref_params.items():
            torch.testing.assert_close(res["params"][name], ref, rtol=1e-4, atol=1e-5, msg=f"{kind} rank {rank} {name}")
        # the optimizer's lrs are untouched by the wrapper after the steps
        assert [g["lr"] for g in res["after_groups"]] == [g["lr"] for g in res["groups"]]
    # replicas (DDP) and gathered shards (FSDP) agree across ranks bit for bit
    for name in ref_params:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name


def test_reference_actually_moves_every_trainable_tensor(reference):
    """Guard: the comparison above is only meaningful if training changes the parameters."""
    _, after = reference
    before = dict(_model().named_parameters())
    for name, p in before.items():
        if p.requires_grad:
            assert not torch.equal(after[name], p.detach()), name
