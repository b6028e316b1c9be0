"""LoraPlusTrainer: a transformers.Trainer with LoRA+ groups, on a tiny random Llama + PEFT LoRA (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from loraplus import LoraPlusError, Role
from loraplus.integrations.transformers import LoraPlusTrainer, LoraPlusTrainerMixin

LR = 1e-3
RATIO = 8.0
WEIGHT_DECAY = 0.05
LR_EMBEDDING = 2e-4
VOCAB = 32
SEQ = 8


def _model(adapter: str = "default") -> torch.nn.Module:
    """A 2-layer random Llama with LoRA on attention and embeddings, and trainable norm copies (no decay)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["norm"])
    model = peft.get_peft_model(base, lora, adapter_name=adapter)
    with torch.no_grad():  # B = 0 at init would leave A without gradient on the first step
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    return model


class _Tokens(Dataset):
    def __init__(self, n: int = 16) -> None:
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, **overrides) -> transformers.TrainingArguments:
    kw = dict(
        output_dir=str(out),
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        per_device_train_batch_size=4,
        max_steps=4,
        lr_scheduler_type="linear",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def _trainer(out: Path, model=None, *, callbacks=None, **overrides) -> LoraPlusTrainer:
    return LoraPlusTrainer(
        model=_model() if model is None else model,
        args=_args(out, **overrides),
        train_dataset=_Tokens(),
        callbacks=callbacks,
        loraplus_ratio=RATIO,
        loraplus_lr_embedding=LR_EMBEDDING,
    )


def _lrs(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- create_optimizer
#
# Ground truth: the optimizer the plain transformers.Trainer builds on the same model with the same
# arguments. LoraPlusTrainer must build the same thing parameter by parameter, except that PEFT's
# B factors (".lora_B." in the name) run at ratio × the learning rate.

_LORAPLUS_KEYS = {"params", "param_names", "role", "name", "loraplus"}  # bookkeeping LoRA+ adds to its groups


def _per_param(opt, model) -> dict[str, dict]:
    """{parameter name: the options of the one group holding it} (LoRA+'s bookkeeping keys left out)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict] = {}
    for group in opt.param_groups:
        options = {k: v for k, v in group.items() if k not in _LORAPLUS_KEYS}
        for p in group["params"]:
            name = names[id(p)]
            assert name not in out, f"{name} is in two groups"
            out[name] = options
    return out


def _is_b(name: str) -> bool:
    return ".lora_B." in name  # how PEFT names the B factor of a LoRA layer


def _assert_as_plain(plain, lora_plus, model, ratio: float) -> None:
    assert type(lora_plus) is type(plain)
    assert lora_plus.defaults == plain.defaults
    want, got = _per_param(plain, model), _per_param(lora_plus, model)
    assert set(want) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    for name, options in want.items():
        expected = {**options, "lr": ratio * options["lr"]} if _is_b(name) else options
        assert got[name] == expected, name
    assert any(_is_b(n) for n in want)


def _both(out: Path, model, ratio: float, *, plain_cls=transformers.Trainer, lp_cls=LoraPlusTrainer, **kw):
    """The plain Trainer's optimizer and LoraPlusTrainer's, on the same model and arguments."""
    extra = {k: kw.pop(k) for k in ("optimizer_cls_and_kwargs",) if k in kw}
    plain = plain_cls(model=model, args=_args(out, **kw), **extra).create_optimizer()
    extra = {k: (v[0], dict(v[1])) for k, v in extra.items()}  # the Trainer may pop from the kwargs dict
    lp = lp_cls(model=model, args=_args(out, **kw), loraplus_ratio=ratio, **extra).create_optimizer()
    return plain, lp


def _model_dora() -> torch.nn.Module:
    """The same random Llama with DoRA on attention: magnitudes are trainable, named without 'norm'."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["norm"]
    )
    return peft.get_peft_model(base, lora)


@pytest.fixture(scope="module")
def shared_model():
    """One PEFT model for tests that only build optimizers (building never changes the model)."""
    return _model()


@pytest.fixture
def bnb_manager():
    """bitsandbytes' process-wide override registry, emptied before and after the test."""
    bnb = pytest.importorskip("bitsandbytes")
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    yield manager
    manager.initialize()


OPTIMS = {  # TrainingArguments.optim -> the class the Trainer picks for it
    "adamw_torch": "torch.optim.adamw.AdamW",
    "sgd": "torch.optim.sgd.SGD",
    "adagrad": "torch.optim.adagrad.Adagrad",
    "rmsprop": "torch.optim.rmsprop.RMSprop",
    "adamw_torch_fused": "torch.optim.adamw.AdamW",
    "adafactor": "transformers.optimization.Adafactor",
    "adamw_bnb_8bit": "bitsandbytes.optim.adamw.AdamW",
    "lion_8bit": "bitsandbytes.optim.lion.Lion",
    "schedule_free_adamw": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}


@pytest.mark.parametrize("ratio", [1.0, 4.0])
@pytest.mark.parametrize("optim", sorted(OPTIMS))
def test_optimizer_is_the_plain_trainers_except_b_learning_rates(tmp_path, shared_model, bnb_manager, optim, ratio):
    """Same class, defaults, parameters and per-parameter options (lr, weight_decay, betas, eps, …)
    as transformers.Trainer; at ratio 1 identical, at ratio 4 only the lora_B lrs differ (× 4)."""
    plain, lp = _both(tmp_path, shared_model, ratio, optim=optim, adam_beta2=0.95, adam_epsilon=1e-6)
    assert f"{type(plain).__module__}.{type(plain).__name__}" == OPTIMS[optim]
    _assert_as_plain(plain, lp, shared_model, ratio)


def test_dora_magnitudes_decay_as_under_the_plain_trainer(tmp_path):
    """The Trainer's get_decay_parameter_names decays DoRA magnitudes; so does LoraPlusTrainer."""
    model = _model_dora()
    plain, lp = _both(tmp_path, model, 4.0)
    _assert_as_plain(plain, lp, model, 4.0)
    decay = _per_param(plain, model)
    assert any("lora_magnitude_vector" in n and o["weight_decay"] == WEIGHT_DECAY for n, o in decay.items())


@settings(max_examples=15, deadline=None)
@given(
    ratio=st.floats(1.0, 64.0),
    lr=st.floats(1e-6, 1e-1),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.01, 0.1]),
    optim=st.sampled_from(["adamw_torch", "sgd", "adagrad"]),
)
def test_any_settings_match_the_plain_trainer(tmp_path_factory, shared_model, ratio, lr, weight_decay, optim):
    out = tmp_path_factory.mktemp("h")
    plain, lp = _both(out, shared_model, ratio, optim=optim, learning_rate=lr, weight_decay=weight_decay)
    _assert_as_plain(plain, lp, shared_model, ratio)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 5e-3, "betas": (0.8, 0.9), "weight_decay": 0.3},  # weight_decay in the kwargs: defaults only
        {"weight_decay": 0.3},  # no lr: the class's default lr, as the plain Trainer gets
    ],
    ids=["lr-betas-weight_decay", "no-lr"],
)
@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_optimizer_cls_and_kwargs_match_the_plain_trainer(tmp_path, shared_model, kwargs, ratio):
    plain, lp = _both(tmp_path, shared_model, ratio, optimizer_cls_and_kwargs=(torch.optim.Adamax, kwargs))
    _assert_as_plain(plain, lp, shared_model, ratio)
    assert lp.defaults["weight_decay"] == 0.3  # the kwargs' value is kept, not dropped


class _DecayEverything:
    def get_decay_parameter_names(self, model):
        return [n for n, _ in model.named_parameters()]


def test_an_overridden_get_decay_parameter_names_is_followed(tmp_path, shared_model):
    plain_cls = type("Plain", (_DecayEverything, transformers.Trainer), {})
    lp_cls = type("LoraPlusDecayAll", (_DecayEverything, LoraPlusTrainer), {})
    plain, lp = _both(tmp_path, shared_model, 4.0, plain_cls=plain_cls, lp_cls=lp_cls)
    _assert_as_plain(plain, lp, shared_model, 4.0)
    assert {o["weight_decay"] for o in _per_param(plain, shared_model).values()} == {WEIGHT_DECAY}  # norms too


def _model_with_big_embedding() -> torch.nn.Module:
    """LoRA on attention, and trainable copies of embed_tokens and lm_head of 256 × 16 = 4096
    elements each: bitsandbytes keeps 8-bit state only for tensors of at least 4096 elements."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    return peft.get_peft_model(base, lora)


def _registered(manager, model) -> list[tuple[str, str, dict]]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return [(names[id(module)], attr, dict(config)) for module, attr, config in manager.module_weight_config_triple]


def _state_dtypes_after_one_step(opt, model) -> dict[str, torch.dtype]:
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return {n: opt.state[p]["state1"].dtype for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_embedding_override_is_registered_as_the_plain_trainer_does(tmp_path, bnb_manager, optim):
    """8-bit bitsandbytes: every nn.Embedding weight is registered for 32-bit state, as by the plain
    Trainer, and after a step its state is float32 while the other large tensors' is uint8."""
    results = []
    for make in (
        lambda m: transformers.Trainer(model=m, args=_args(tmp_path, optim=optim)),
        lambda m: LoraPlusTrainer(model=m, args=_args(tmp_path, optim=optim), loraplus_ratio=1.0),
    ):
        bnb_manager.initialize()
        model = _model_with_big_embedding()
        opt = make(model).create_optimizer()
        registered = _registered(bnb_manager, model)
        results.append((registered, _state_dtypes_after_one_step(opt, model)))
    (plain_reg, plain_dtypes), (lp_reg, lp_dtypes) = results
    assert lp_reg == plain_reg
    assert lp_dtypes == plain_dtypes
    embeddings = {n for n, m in _model_with_big_embedding().named_modules() if isinstance(m, torch.nn.Embedding)}
    trained_embedding = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    if "8bit" in optim:
        assert {(n, "weight") for n in embeddings} == {(n, a) for n, a, _ in plain_reg}
        assert {c["optim_bits"] for _, _, c in plain_reg} == {32}
        assert plain_dtypes[trained_embedding] == torch.float32
        assert plain_dtypes["base_model.model.lm_head.modules_to_save.default.weight"] == torch.uint8
    else:
        assert plain_reg == [] and set(plain_dtypes.values()) == {torch.float32}


def test_what_the_trainer_does_after_building_still_happens(tmp_path, shared_model, monkeypatch):
    """Trainer.create_optimizer wraps the optimizer for SageMaker model parallelism after building it;
    LoraPlusTrainer leaves that (and whatever else follows the build) to the Trainer."""

    class FakeSmp:
        class DistributedOptimizer:
            def __init__(self, optimizer):
                self.optimizer = optimizer

    trainers = [
        transformers.Trainer(model=shared_model, args=_args(tmp_path)),
        LoraPlusTrainer(model=shared_model, args=_args(tmp_path), loraplus_ratio=1.0),
    ]
    monkeypatch.setattr(transformers.trainer, "is_sagemaker_mp_enabled", lambda: True)
    monkeypatch.setattr(transformers.trainer, "smp", FakeSmp, raising=False)
    plain, lp = (t.create_optimizer() for t in trainers)
    assert type(plain) is type(lp) is FakeSmp.DistributedOptimizer
    _assert_as_plain(plain.optimizer, lp.optimizer, shared_model, 1.0)


def _with_tests_on_path() -> dict[str, str]:
    """The environment for a ``python -c`` script that imports ``_ranks`` from this folder (argv[1] names it too)."""
    path = [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


_DTENSOR_SCRIPT = """
import json, os, sys
os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from _ranks import Rendezvous, join, leave
rendezvous = Rendezvous.fresh(sys.argv[2], world_size=1)
join(0, rendezvous)  # a file store: no port to take
import transformers
import test_trainer as T
from loraplus.integrations.transformers import LoraPlusTrainer

full = init_device_mesh("cpu", (1, 1), mesh_dim_names=("fsdp", "tp"))  # e.g. experts on the full mesh
sub = full["fsdp"]  # the rest on the fsdp sub-mesh
model = T._model()
for prefix, module in model.named_modules():
    for key, p in list(module.named_parameters(recurse=False)):
        name = f"{prefix}.{key}"
        mesh = full if ".layers.0." in name else sub if ".layers.1." in name else None
        if p.requires_grad and mesh is not None:  # layer-1 factors on one mesh, layer-2 on another, embeddings plain
            shared = distribute_tensor(p.detach(), mesh, [Replicate()] * mesh.ndim)
            module.register_parameter(key, torch.nn.Parameter(shared))
out = {}
for ratio in (1.0, 4.0):
    plain = transformers.Trainer(model=T._model(), args=T._args(sys.argv[2])).create_optimizer(model)
    lp = LoraPlusTrainer(model=T._model(), args=T._args(sys.argv[2]), loraplus_ratio=ratio).create_optimizer(model)
    T._assert_as_plain(plain, lp, model, ratio)
    meshes = lambda opt: [sorted({repr(p.device_mesh) if isinstance(p, DTensor) else "plain" for p in g["params"]})
                          for g in opt.param_groups]
    names = [g["name"] for g in lp.param_groups]
    out[str(ratio)] = {"plain_meshes": meshes(plain), "meshes": meshes(lp), "names": names}
print("RESULT" + json.dumps(out))
leave(0, rendezvous, ok=True)
"""


def test_parameters_on_different_device_meshes_get_separate_groups_as_in_the_plain_trainer(tmp_path):
    """Trainer.create_optimizer gives each DTensor device mesh its own groups (no fused/foreach kernel
    spans two meshes); LoraPlusTrainer splits its role groups the same way and still matches the plain
    Trainer parameter by parameter. One gloo rank, a 2-D mesh and its sub-mesh, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", _DTENSOR_SCRIPT, str(Path(__file__).parent), str(tmp_path)],
        env=_with_tests_on_path(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    for ratio, out in json.loads(lines[-1][len("RESULT") :]).items():
        assert len(out["plain_meshes"]) > 2, ratio  # the plain Trainer did split by mesh
        assert all(len(m) == 1 for m in out["plain_meshes"] + out["meshes"]), ratio  # one mesh per group
        assert len(set(out["names"])) == len(out["names"]), out["names"]
        # the Trainer's decay group splits into three meshes (the plain embedding adapters first, then
        # layer 0, layer 1), its no-decay group too; each split group's B factors get their own sibling
        assert out["names"] == [
            "group0", "group1", "group1.B", "group2", "group2.B", "group3", "group4", "group5",
        ], out["names"]


def test_create_optimizer_builds_named_loraplus_groups(tmp_path):
    trainer = _trainer(tmp_path)
    opt = trainer.create_optimizer()
    assert opt is trainer.optimizer and trainer.create_optimizer() is opt  # built once
    assert _lrs(opt) == {  # the Trainer's decay group, its B factors and embedding adapters, its no-decay group
        "group0": LR,
        "group0.B": RATIO * LR,
        "group0.embedding_A": LR_EMBEDDING,
        "group0.embedding_B": LR_EMBEDDING,
        "group1": LR,  # the trainable copy of the final RMSNorm
    }


def test_optimizers_that_replace_the_groups_are_rejected(tmp_path):
    trainer = LoraPlusTrainer(
        model=_model(), args=_args(tmp_path), optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3, "params": []})
    )
    with pytest.raises(LoraPlusError, match=r"optimizer_cls_and_kwargs \(AdamW\) builds its own parameter groups \(params\)"):
        trainer.create_optimizer()


def test_bad_loraplus_settings_fail_at_construction(tmp_path):
    with pytest.raises(LoraPlusError, match="loraplus_ratio must be a number"):
        LoraPlusTrainer(model=_model(), args=_args(tmp_path), loraplus_ratio="16")


def test_bad_rules_role_lr_and_no_decay_also_fail_at_construction(tmp_path):
    with pytest.raises(LoraPlusError, match="unknown role 'beta'"):
        LoraPlusTrainer(model=_model(), args=_args(tmp_path), loraplus_role_lr={"beta": 1.0})
    with pytest.raises(LoraPlusError, match="cannot use"):
        LoraPlusTrainer(model=_model(), args=_args(tmp_path), loraplus_rules=[("x",)])
    with pytest.raises(LoraPlusError, match="no_decay entries must be"):
        LoraPlusTrainer(model=_model(), args=_args(tmp_path), loraplus_no_decay=[3])


def test_model_without_adapters_gives_loraplus_error(tmp_path):
    trainer = LoraPlusTrainer(model=torch.nn.Linear(2, 2), args=_args(tmp_path))
    with pytest.raises(LoraPlusError, match="no LoRA adapter parameters"):
        trainer.create_optimizer()


def test_rules_and_role_lr_reach_the_groups(tmp_path):
    trainer = LoraPlusTrainer(
        model=_model(),
        args=_args(tmp_path),
        loraplus_role_lr={Role.EMBEDDING_B: 7e-4},
        loraplus_rules={"*.lm_head.weight": Role.OTHER},
        loraplus_no_decay=["*lora_embedding_A*"],
    )
    opt = trainer.create_optimizer()
    names = {g["name"]: g for g in opt.param_groups}
    assert names["group0.embedding_B"]["lr"] == 7e-4
    assert names["group1"]["weight_decay"] == 0.0  # the no-decay rule moved embedding_A to the Trainer's no-decay group
    assert any("lora_embedding_A" in n for n in names["group1"]["param_names"])


def test_no_private_trainer_method_is_overridden():
    private = [n for c in LoraPlusTrainer.__mro__[:2] for n in vars(c) if n.startswith("_") and not n.startswith("__")]
    assert LoraPlusTrainer.__mro__[1] is LoraPlusTrainerMixin
    assert [n for n in private if hasattr(transformers.Trainer, n)] == []


# --------------------------------------------------------------------------- training and resume


class _RecordLrs(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append(_lrs(optimizer))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    record = _RecordLrs()
    trainer = _trainer(out, callbacks=[record])
    before = _trainable(trainer.model)
    trainer.train()
    return {
        "out": out,
        "before": before,
        "after": _trainable(trainer.model),
        "lrs": record.steps,
        "groups": [(g["name"], g.get("role"), list(g["param_names"])) for g in trainer.optimizer.param_groups],
        "state_steps": sorted({int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}),
    }


def test_training_keeps_the_ratio_under_the_trainer_scheduler(full_run):
    assert len(full_run["lrs"]) == 4
    assert len({tuple(s.values()) for s in full_run["lrs"]}) > 1  # the linear schedule moves
    for step in full_run["lrs"]:
        assert step["group0.B"] == pytest.approx(RATIO * step["group0"], rel=1e-12)
        assert step["group0.embedding_A"] == pytest.approx(step["group0"] * LR_EMBEDDING / LR, rel=1e-12)
    for name, p in full_run["before"].items():
        assert not torch.equal(p, full_run["after"][name]), f"{name} did not train"


def _count_optimizer_reads(monkeypatch) -> list[str]:
    """Record every torch.load of an optimizer.pt from now on."""
    reads: list[str] = []
    real_load = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).name == "optimizer.pt":
            reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return reads


def test_resume_from_checkpoint_restores_loraplus_groups_and_continues_identically(full_run, tmp_path, monkeypatch):
    checkpoint = full_run["out"] / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [(g["name"], g.get("role")) for g in saved["param_groups"]] == [(n, r) for n, r, _ in full_run["groups"]]

    record = _RecordLrs()
    trainer = _trainer(tmp_path, callbacks=[record])  # fresh model: same init, loaded from the checkpoint
    reads = _count_optimizer_reads(monkeypatch)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert reads == [str(checkpoint / "optimizer.pt")]  # read once, by the Trainer
    groups = [(g["name"], g.get("role"), list(g["param_names"])) for g in trainer.optimizer.param_groups]
    assert groups == full_run["groups"]
    assert record.steps == full_run["lrs"][2:]  # the schedule resumes at step 3
    assert sorted({int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}) == full_run["state_steps"]
    after = _trainable(trainer.model)
    for name, p in full_run["after"].items():
        torch.testing.assert_close(after[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_other_groups_raises_instead_of_loading_by_position(full_run, tmp_path, monkeypatch):
    """Same tensor count, different grouping: torch alone would load the state silently."""
    checkpoint = full_run["out"] / "checkpoint-2"
    trainer = LoraPlusTrainer(
        model=_model(),
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        loraplus_ratio=RATIO,
        loraplus_no_decay=lambda name, param, module: False,  # the norm copies now decay: group "other"
    )
    reads = _count_optimizer_reads(monkeypatch)
    with pytest.raises(LoraPlusError, match="does not match this optimizer's param groups"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert reads == [str(checkpoint / "optimizer.pt")]



def test_resume_with_a_renamed_adapter_says_only_names_differ(tmp_path):
    """The pre-hook's check on the state the Trainer loads: an adapter renamed from 'default' to 'sft' is
    reported as a renaming (not as another model), and nothing is loaded."""
    saved = _trainer(tmp_path / "default").create_optimizer().state_dict()
    optimizer = _trainer(tmp_path / "sft", _model("sft")).create_optimizer()
    renamed = [n for n, p in _model().named_parameters() if p.requires_grad and "default" in n.split(".")]
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    with pytest.raises(
        LoraPlusError,
        match=rf"only names differ: saved '{q}.default.weight', current '{q}.sft.weight' \({len(renamed)} names\)"
        r".*rename=\{'default': 'sft'\}",
    ):
        optimizer.load_state_dict(saved)  # what the Trainer's resume calls
    assert not optimizer.state
    as_advised = [  # the message's advice where the Trainer loads: rename the saved param_names the same way
        {**g, "param_names": [".".join("sft" if seg == "default" else seg for seg in n.split(".")) for n in g["param_names"]]}
        for g in saved["param_groups"]
    ]
    optimizer.load_state_dict({**saved, "param_groups": as_advised})


_DEEPSPEED_SCRIPT = """
import json, os, sys
os.environ.update({"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
import deepspeed.ops
deepspeed.ops.__compatible_ops__ = {}  # no compiler probe, no JIT build of the shm comm kernel
from _ranks import Rendezvous, join, leave
rendezvous = Rendezvous.fresh(sys.argv[2], world_size=1)
join(0, rendezvous)  # the Trainer adopts this group (a file store: no port to take)
import test_trainer as T
from loraplus import LoraPlusError

base = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
out = {}
try:
    with_optimizer = {**base, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    T._trainer(sys.argv[2] + "/a", deepspeed=with_optimizer, save_strategy="no")
    out["error"] = None
except LoraPlusError as err:
    out["error"] = str(err)
record = T._RecordLrs()
trainer = T._trainer(sys.argv[2] + "/b", deepspeed=base, save_strategy="no", callbacks=[record])
trainer.train()
inner = trainer.optimizer
while hasattr(inner, "optimizer"):
    inner = inner.optimizer
out["wrappers"] = type(trainer.optimizer).__name__
out["groups"] = [g.get("name") for g in inner.param_groups]
out["lrs"] = record.steps
print("RESULT" + json.dumps(out))
leave(0, rendezvous, ok=True)
"""


def test_trainer_under_deepspeed_hands_the_loraplus_groups_to_the_engine(tmp_path):
    """Trainer + DeepSpeed ZeRO-2 (1 CPU rank, in a subprocess so no process group leaks here).

    Without an ``optimizer`` section the Trainer passes LoraPlusTrainer's optimizer to DeepSpeed
    and the groups survive; with one, DeepSpeed would build a single group, so construction raises."""
    proc = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_SCRIPT, str(Path(__file__).parent), str(tmp_path)],
        env=_with_tests_on_path(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT") :])
    assert out["error"] is not None and "'optimizer' section" in out["error"]
    assert out["groups"] == ["group0", "group0.B", "group0.embedding_A", "group0.embedding_B", "group1"]
    assert len(out["lrs"]) == 4
    for step in out["lrs"]:
        assert step["group0.B"] == pytest.approx(RATIO * step["group0"], rel=1e-12)


def test_core_import_does_not_import_transformers():
    code = (
        "import sys, loraplus, loraplus.integrations; "
        "bad = [m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compatibility_sections_cite_only_existing_tests():
    """The Distributed and Trainer rows of docs/compatibility.md name tests that exist."""
    import re

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "compatibility.md").read_text(encoding="utf-8")
    keep, text = False, []
    for line in page.splitlines():
        if line.startswith("## "):
            keep = line[3:] in {"Distributed training", "Trainer and framework integrations"}
        elif keep:
            text.append(line)
    defined = set()
    for path in (root / "tests").glob("test_*.py"):
        defined.add(path.stem)
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    cited = set(re.findall(r"(?<![\w/])(test_\w+)", "\n".join(text)))
    assert len(cited) > 15
    assert cited <= defined, f"docs/compatibility.md cites tests that do not exist: {sorted(cited - defined)}"
