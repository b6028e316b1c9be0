"""Differential test: loraplus.compat vs the installed PEFT create_loraplus_optimizer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_create
from torch import nn

import loraplus
from loraplus.compat import create_loraplus_optimizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


CONFIGS = {
    "lora": dict(r=2, target_modules=["q", "v"]),
    "lora_embedding": dict(r=2, target_modules=["q", "v", "embed"]),
    "dora": dict(r=2, target_modules=["q", "v"], use_dora=True),
    "lora_bias": dict(r=2, target_modules=["q"], lora_bias=True),
    "modules_to_save": dict(r=2, target_modules=["q", "v"], modules_to_save=["head", "norm"]),
    "bias_all": dict(r=2, target_modules=["q", "v"], bias="all"),
}


def _per_param(opt):
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kwargs", [{}, {"loraplus_weight_decay": 0.05, "loraplus_lr_embedding": 3e-4}])
def test_same_lr_decay_and_membership_as_peft(config, kwargs):
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(**CONFIGS[config]))
    theirs = peft_create(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, **kwargs)
    ours = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, **kwargs)
    assert type(ours) is type(theirs)
    assert _per_param(ours) == _per_param(theirs)
    assert all(g["params"] for g in ours.param_groups)  # PEFT emits empty groups; we never do
    names = {g["name"] for g in ours.param_groups}
    assert names <= {"groupA", "embedding", "groupB", "groupB_no_decay"}
    assert len(ours.param_groups) == sum(1 for g in theirs.param_groups if g["params"])


def test_documented_differences_from_loraplus():
    """The compat function keeps PEFT's choices; LoraPlus fixes them."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["q", "v", "embed"], use_dora=True, modules_to_save=["norm"]))
    compat = _per_param(create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, weight_decay=0.1))
    ours = _per_param(loraplus.LoraPlus(torch.optim.AdamW, model, 16, lr=1e-4, weight_decay=0.1))
    named = dict(model.named_parameters())
    mag = named["base_model.model.q.lora_magnitude_vector.default.weight"]
    norm_w = named["base_model.model.norm.modules_to_save.default.weight"]
    emb_b = named["base_model.model.embed.lora_embedding_B.default"]
    lora_a = named["base_model.model.q.lora_A.default.weight"]
    assert compat[id(mag)] == (16e-4, 0.0) and ours[id(mag)] == (1e-4, 0.0)  # 1-D -> B lr in PEFT
    assert compat[id(norm_w)][0] == 16e-4 and ours[id(norm_w)] == (1e-4, 0.0)
    assert compat[id(emb_b)] == (1e-6, 0.0) and ours[id(emb_b)] == (1e-4, 0.1)  # pinned to 1e-6 in PEFT
    assert compat[id(lora_a)] == (1e-4, 0.0) and ours[id(lora_a)] == (1e-4, 0.1)  # weight_decay dropped in PEFT


def test_compat_validates_input():
    model = loraplus.testing.tiny_lora_model()
    with pytest.raises(loraplus.LoraPlusError, match="loraplus_lr_ratio must be a number"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio="16")


def test_peft_embeddings_are_recognised_by_type_and_peft_is_not_imported_for_a_model_without_it():
    import subprocess
    import sys

    from peft.tuners.lora import Embedding

    from loraplus.compat import _is_peft_lora_embedding

    model = get_peft_model(Net(), LoraConfig(**CONFIGS["lora_embedding"]))
    embeds = [m for m in model.modules() if isinstance(m, Embedding)]
    assert len(embeds) == 1 and _is_peft_lora_embedding(embeds[0])
    assert not any(_is_peft_lora_embedding(m) for m in model.modules() if m is not embeds[0])

    look_alike = type("Embedding", (nn.Embedding,), {"__module__": "peft.tuners.lora.layer"})  # not PEFT's class
    assert not _is_peft_lora_embedding(look_alike(3, 2))
    script = (
        "import sys, torch, loraplus\n"
        "from loraplus.compat import create_loraplus_optimizer\n"
        "model = loraplus.testing.tiny_lora_model()\n"
        "create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)\n"
        "print('peft' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode, done.stdout) == (0, "False\n"), done.stderr
