"""LoraPlusTrainerMixin on TRL's SFTTrainer (the real trl package): the optimizer SFTTrainer builds,
parameter by parameter, except that PEFT's B factors run at ratio × their group's rate."""

from __future__ import annotations

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
