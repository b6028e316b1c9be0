"""LoraPlusTrainer: a transformers.Trainer with LoRA+ groups, on a tiny random Llama + PEFT LoRA (CPU)."""

from __future__ import annotations

import json
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

import loraplus
from loraplus import LoraPlusError, Role
from loraplus.integrations.transformers import LoraPlusTrainer
from loraplus.testing import assert_loraplus_groups

LR = 1e-3
RATIO = 8.0
WEIGHT_DECAY = 0.05
LR_EMBEDDING = 2e-4
VOCAB = 32
SEQ = 8


def _model() -> torch.nn.Module:
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
    model = peft.get_peft_model(base, lora)
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


def test_create_optimizer_builds_loraplus_groups_from_training_arguments(tmp_path):
    trainer = _trainer(tmp_path, adam_beta2=0.95, adam_epsilon=1e-6)
    opt = trainer.create_optimizer()
    assert type(opt) is torch.optim.AdamW  # optim="adamw_torch" (the default) picked as the Trainer does
    assert opt is trainer.optimizer and trainer.create_optimizer() is opt  # built once
    assert_loraplus_groups(opt, trainer.model, ratio=RATIO, lr=LR, weight_decay=WEIGHT_DECAY)
    assert _lrs(opt) == {
        "A": LR,
        "B": RATIO * LR,
        "embedding_A": LR_EMBEDDING,
        "embedding_B": LR_EMBEDDING,
        "other.no_decay": LR,  # the trainable copy of the final RMSNorm
    }
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6


def test_weight_decay_is_honoured_on_every_decaying_group(tmp_path):
    """PEFT's create_loraplus_optimizer sets every group's decay to loraplus_weight_decay (0 by
    default), dropping TrainingArguments.weight_decay; LoraPlusTrainer keeps it."""
    opt = _trainer(tmp_path).create_optimizer()
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays == {
        "A": WEIGHT_DECAY,
        "B": WEIGHT_DECAY,
        "embedding_A": WEIGHT_DECAY,
        "embedding_B": WEIGHT_DECAY,
        "other.no_decay": 0.0,
    }


OPTIMS = {  # TrainingArguments.optim -> the class the Trainer picks for it
    "sgd": "torch.optim.sgd.SGD",
    "adagrad": "torch.optim.adagrad.Adagrad",
    "rmsprop": "torch.optim.rmsprop.RMSprop",
    "adamw_torch_fused": "torch.optim.adamw.AdamW",
    "adafactor": "transformers.optimization.Adafactor",
    "adamw_bnb_8bit": "bitsandbytes.optim.adamw.AdamW",
    "lion_8bit": "bitsandbytes.optim.lion.Lion",
    "schedule_free_adamw": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}


@pytest.fixture(scope="module")
def shared_model():
    """One PEFT model for tests that only build optimizers (building never changes the model)."""
    return _model()


@pytest.mark.parametrize("optim", sorted(OPTIMS))
def test_optim_choice_is_respected(tmp_path, shared_model, optim):
    trainer = LoraPlusTrainer(model=shared_model, args=_args(tmp_path, optim=optim), loraplus_ratio=RATIO)
    opt = trainer.create_optimizer()
    assert f"{type(opt).__module__}.{type(opt).__name__}" == OPTIMS[optim]
    assert_loraplus_groups(opt, shared_model, ratio=RATIO, lr=LR, weight_decay=WEIGHT_DECAY)


@settings(max_examples=15, deadline=None)
@given(
    ratio=st.floats(1.0, 64.0),
    lr=st.floats(1e-6, 1e-1),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.01, 0.1]),
    optim=st.sampled_from(["adamw_torch", "sgd", "adagrad"]),
)
def test_any_settings_give_sound_loraplus_groups(tmp_path_factory, shared_model, ratio, lr, weight_decay, optim):
    args = _args(tmp_path_factory.mktemp("h"), optim=optim, learning_rate=lr, weight_decay=weight_decay)
    opt = LoraPlusTrainer(model=shared_model, args=args, loraplus_ratio=ratio).create_optimizer()
    assert_loraplus_groups(opt, shared_model, ratio=ratio, lr=lr, weight_decay=weight_decay)
    assert {g["role"]: g["lr"] for g in opt.param_groups}["embedding_B"] == lr  # default: the A lr


def test_optimizer_cls_and_kwargs_argument_is_used(tmp_path):
    trainer = LoraPlusTrainer(
        model=_model(),
        args=_args(tmp_path),
        optimizer_cls_and_kwargs=(torch.optim.Adamax, {"lr": 5e-3, "betas": (0.8, 0.9), "weight_decay": 0.3}),
        loraplus_ratio=4,
    )
    opt = trainer.create_optimizer()
    assert type(opt) is torch.optim.Adamax
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs["A"] == 5e-3 and lrs["B"] == 4 * 5e-3
    # args.weight_decay, not the kwargs' value, goes on the decaying groups
    assert {g["weight_decay"] for g in opt.param_groups if not g["name"].endswith("no_decay")} == {WEIGHT_DECAY}
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


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


def test_default_ratio_keeps_the_family_defaults_as_loraplus_does(tmp_path):
    """Regression: the Trainer once turned the default-ratio marker into a plain float."""
    from loraplus.testing import build_model

    spec = {"conv": "peft_loha", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False}
    model = build_model([spec], head=False, norm=False).model
    trainer = LoraPlusTrainer(model=model, args=_args(tmp_path, optim="sgd", learning_rate=1.0))
    expected = {g["name"]: g["lr"] for g in loraplus.param_groups(model, lr=1.0)}
    assert _lrs(trainer.create_optimizer()) == expected == {"A": 1.0, "B": 1.0}


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
    assert names["embedding_B"]["lr"] == 7e-4
    assert "embedding_A.no_decay" in names and names["embedding_A.no_decay"]["weight_decay"] == 0.0


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
        "groups": [(g["name"], g["role"], list(g["param_names"])) for g in trainer.optimizer.param_groups],
        "state_steps": sorted({int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}),
    }


def test_training_keeps_the_ratio_under_the_trainer_scheduler(full_run):
    assert len(full_run["lrs"]) == 4
    assert len({tuple(s.values()) for s in full_run["lrs"]}) > 1  # the linear schedule moves
    for step in full_run["lrs"]:
        assert step["B"] == pytest.approx(RATIO * step["A"], rel=1e-12)
        assert step["embedding_A"] == pytest.approx(step["A"] * LR_EMBEDDING / LR, rel=1e-12)
    for name, p in full_run["before"].items():
        assert not torch.equal(p, full_run["after"][name]), f"{name} did not train"


def test_resume_from_checkpoint_restores_loraplus_groups_and_continues_identically(full_run, tmp_path):
    checkpoint = full_run["out"] / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [(g["name"], g["role"]) for g in saved["param_groups"]] == [(n, r) for n, r, _ in full_run["groups"]]

    record = _RecordLrs()
    trainer = _trainer(tmp_path, callbacks=[record])  # fresh model: same init, loaded from the checkpoint
    trainer.train(resume_from_checkpoint=str(checkpoint))
    groups = [(g["name"], g["role"], list(g["param_names"])) for g in trainer.optimizer.param_groups]
    assert groups == full_run["groups"]
    assert record.steps == full_run["lrs"][2:]  # the schedule resumes at step 3
    assert sorted({int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}) == full_run["state_steps"]
    after = _trainable(trainer.model)
    for name, p in full_run["after"].items():
        torch.testing.assert_close(after[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_other_groups_raises_instead_of_loading_by_position(full_run, tmp_path):
    """Same tensor count, different grouping: torch alone would load the state silently."""
    checkpoint = full_run["out"] / "checkpoint-2"
    trainer = LoraPlusTrainer(
        model=_model(),
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        loraplus_ratio=RATIO,
        loraplus_no_decay=lambda name, param, module: False,  # the norm copies now decay: group "other"
    )
    with pytest.raises(LoraPlusError, match="does not match this optimizer's param groups"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


_DEEPSPEED_SCRIPT = """
import json, os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update({"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                   "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
if sys.platform.startswith("linux"):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
import deepspeed.ops
deepspeed.ops.__compatible_ops__ = {}  # no compiler probe, no JIT build of the shm comm kernel
sys.path.insert(0, sys.argv[1])
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
"""


def test_trainer_under_deepspeed_hands_the_loraplus_groups_to_the_engine(tmp_path):
    """Trainer + DeepSpeed ZeRO-2 (1 CPU rank, in a subprocess so no process group leaks here).

    Without an ``optimizer`` section the Trainer passes LoraPlusTrainer's optimizer to DeepSpeed
    and the groups survive; with one, DeepSpeed would build a single group, so construction raises."""
    proc = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_SCRIPT, str(Path(__file__).parent), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT") :])
    assert out["error"] is not None and "'optimizer' section" in out["error"]
    assert out["groups"] == ["A", "B", "embedding_A", "embedding_B", "other.no_decay"]
    assert len(out["lrs"]) == 4
    for step in out["lrs"]:
        assert step["B"] == pytest.approx(RATIO * step["A"], rel=1e-12)


def test_core_import_does_not_import_transformers():
    code = (
        "import sys, loraplus, loraplus.integrations; "
        "bad = [m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert "loraplus" in loraplus.__name__


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
