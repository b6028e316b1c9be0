"""LoraPlusTrainerMixin on TRL's SFTTrainer (the real trl package): the optimizer SFTTrainer builds,
parameter by parameter, except that PEFT's B factors run at ratio × their group's rate."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import test_trainer as T  # noqa: E402  (the same tiny PEFT Llama and the same parity check)

from loraplus.integrations.transformers import LoraPlusTrainerMixin  # noqa: E402


class LoraPlusSFTTrainer(LoraPlusTrainerMixin, trl.SFTTrainer):
    pass


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(T.VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def _config(out):
    return trl.SFTConfig(
        str(out), learning_rate=T.LR, weight_decay=T.WEIGHT_DECAY, max_steps=3, warmup_steps=1,
        per_device_train_batch_size=4, report_to="none", use_cpu=True, logging_strategy="no", save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip


def test_sft_trainer_with_the_mixin_equals_sft_trainer_except_b_rates_and_keeps_the_ratio(tmp_path):
    ids = torch.randint(0, T.VOCAB, (8, T.SEQ), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids})
    model = T._model()
    kw = dict(model=model, args=_config(tmp_path), train_dataset=data, processing_class=_tokenizer())
    plain = trl.SFTTrainer(**kw).create_optimizer()
    record = T._RecordLrs()
    trainer = LoraPlusSFTTrainer(**kw, callbacks=[record], loraplus_ratio=8.0)
    T._assert_as_plain(plain, trainer.create_optimizer(), model, 8.0)
    trainer.train()
    assert len(record.steps) == 3
    for step in record.steps:
        assert step["group0.B"] == pytest.approx(8.0 * step["group0"], rel=1e-12)
    assert any(step["group0"] > 0 for step in record.steps)


# --------------------------------------------------------------------------- preference and RL trainers
#
# Peers report TRL-based preference/RL trainers ignoring a swapped-in LoRA+ optimizer's scheduler
# (Soup #745: B stays at a constant rate while warm-up and decay reach only the other groups). Here
# each TRL trainer runs twice on the same model and data, stock and with the mixin, through warm-up
# and decay. Ground truth is the stock trainer's scheduler: at every optimizer step each parameter's
# rate under the mixin must be the stock rate of that parameter, times the ratio for PEFT's B factors.

RATIO = 8.0
STEPS = 6  # warm-up over steps 0-1, peak at 2, cosine decay over 3-5
WARMUP = 2
SAVE_AT = 3


class LoraPlusDPOTrainer(LoraPlusTrainerMixin, trl.DPOTrainer):
    pass


class LoraPlusGRPOTrainer(LoraPlusTrainerMixin, trl.GRPOTrainer):
    pass


def _words(n: int, count: int, seed: int) -> list[str]:
    """``count`` strings of ``n`` words of the tiny tokenizer (ids 2.., so no pad or eos)."""
    ids = torch.randint(2, T.VOCAB, (count, n), generator=torch.Generator().manual_seed(seed))
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def _preferences() -> datasets.Dataset:
    # completions start with a space: TRL joins prompt + completion, and "t3" + "t4" would be one unknown word
    chosen, rejected = ([" " + w for w in _words(3, 8, seed)] for seed in (2, 3))
    return datasets.Dataset.from_dict({"prompt": _words(3, 8, 1), "chosen": chosen, "rejected": rejected})


def _prompts() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": _words(3, 8, 4)})


def _longer_is_better(completions, **kwargs) -> list[float]:
    return [float(len(c)) for c in completions]


@dataclass(frozen=True)
class _Case:
    """One TRL trainer: its class (stock and with the mixin), its config class and extra settings,
    its data and any extra trainer keywords."""

    stock: type
    with_mixin: type
    config: type
    settings: Mapping[str, Any]
    data: Callable[[], datasets.Dataset]
    extra: Mapping[str, Any] = field(default_factory=dict)


CASES = {
    "dpo": _Case(trl.DPOTrainer, LoraPlusDPOTrainer, trl.DPOConfig, {}, _preferences),
    "grpo": _Case(
        trl.GRPOTrainer,
        LoraPlusGRPOTrainer,
        trl.GRPOConfig,
        {"num_generations": 2, "max_completion_length": 4},  # prompt 3 + 4 tokens fit the model's 8 positions
        _prompts,
        {"reward_funcs": _longer_is_better},
    ),
}


class _RecordRates(transformers.TrainerCallback):
    """Before every optimizer step: the learning rate of every parameter (by name), read from the
    groups of the torch optimizer itself (the Trainer hands callbacks accelerate's wrapper), and at
    the first step the optimizer state the step starts from."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.first_state: dict | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # through accelerate's AcceleratedOptimizer
        assert type(inner) is torch.optim.AdamW
        if self.first_state is None:
            self.first_state = copy.deepcopy(inner.state_dict()["state"])
        rates = {self.names[id(p)]: g["lr"] for g in inner.param_groups for p in g["params"]}
        self.steps.append((state.global_step, rates))


def _case_config(case: _Case, out) -> Any:
    return case.config(
        str(out), learning_rate=T.LR, weight_decay=T.WEIGHT_DECAY, max_steps=STEPS, warmup_steps=WARMUP,
        lr_scheduler_type="cosine", per_device_train_batch_size=4, save_strategy="steps", save_steps=SAVE_AT,
        report_to="none", use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0, **case.settings,
    )  # fmt: skip


def _run(case: _Case, out, *, mixin: bool, resume: Path | None = None) -> dict[str, Any]:
    model = T._model()
    record = _RecordRates(model)
    cls = case.with_mixin if mixin else case.stock
    kw = {"loraplus_ratio": RATIO} if mixin else {}
    trainer = cls(
        model=model, args=_case_config(case, out), train_dataset=case.data(), processing_class=_tokenizer(),
        callbacks=[record], **case.extra, **kw,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    state = getattr(trainer.optimizer, "optimizer", trainer.optimizer).state_dict()["state"]
    return {"out": Path(out), "steps": record.steps, "first_state": record.first_state, "final_state": state}


@pytest.fixture(scope="module", params=sorted(CASES))
def trl_runs(request, tmp_path_factory):
    case = CASES[request.param]
    stock = _run(case, tmp_path_factory.mktemp(f"{request.param}_stock"), mixin=False)
    lora_plus = _run(case, tmp_path_factory.mktemp(f"{request.param}_loraplus"), mixin=True)
    return case, stock, lora_plus


def _assert_stock_rates_times_ratio(stock_steps, lora_plus_steps) -> None:
    """Per step and parameter: the stock rate, times RATIO for B; and so, within the LoRA+ run, each
    B at RATIO × its A partner's rate (PEFT names them ``….lora_A.<adapter>.weight``/``….lora_B.…``)."""
    assert [k for k, _ in lora_plus_steps] == [k for k, _ in stock_steps]
    for (k, want), (_, got) in zip(stock_steps, lora_plus_steps):
        assert set(got) == set(want)
        for name, lr in want.items():
            expected = RATIO * lr if T._is_b(name) else lr
            assert got[name] == pytest.approx(expected, rel=1e-12, abs=0.0), (k, name)
            if T._is_b(name):
                partner = got[name.replace(".lora_B.", ".lora_A.")]
                assert got[name] == pytest.approx(RATIO * partner, rel=1e-12, abs=0.0), (k, name)


def test_trl_trainer_with_the_mixin_keeps_the_ratio_at_every_step_of_the_stock_schedule(trl_runs):
    case, stock, lora_plus = trl_runs
    assert [k for k, _ in stock["steps"]] == list(range(STEPS))
    peak = [max(rates.values()) for _, rates in stock["steps"]]  # the stock schedule: up, then down
    assert peak[0] < peak[1] < peak[WARMUP] == T.LR
    assert peak[WARMUP] > peak[3] > peak[4] > peak[5] > 0
    _assert_stock_rates_times_ratio(stock["steps"], lora_plus["steps"])
    b = [n for n in stock["steps"][0][1] if T._is_b(n)]
    assert b and all(lora_plus["steps"][WARMUP][1][n] == RATIO * T.LR for n in b)


def test_trl_trainer_with_the_mixin_resumes_the_schedule_and_the_optimizer_state(trl_runs, tmp_path):
    case, stock, lora_plus = trl_runs
    checkpoint = lora_plus["out"] / f"checkpoint-{SAVE_AT}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in saved["state"].values()} == {SAVE_AT}
    resumed = _run(case, tmp_path, mixin=True, resume=checkpoint)
    assert [k for k, _ in resumed["steps"]] == list(range(SAVE_AT, STEPS))
    _assert_stock_rates_times_ratio(stock["steps"][SAVE_AT:], resumed["steps"])
    # the first resumed step starts from the saved moments, not from a fresh optimizer
    first = resumed["first_state"]
    assert set(first) == set(saved["state"])
    for i, s in saved["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(first[i][key], value, rtol=0, atol=0, msg=f"state[{i}][{key}]")
    assert {int(s["step"]) for s in resumed["final_state"].values()} == {STEPS}
