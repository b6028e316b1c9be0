"""Construction time of a LoRA+ optimizer on a large mixture-of-experts LoRA model.

Builds, on the meta device (no memory, no data), a decoder with ``--layers`` layers of
``--experts`` experts, each expert an MLP whose ``gate_proj``/``up_proj``/``down_proj`` carry a
PEFT-named LoRA adapter (``…lora_A.default.weight`` / ``…lora_B.default.weight``), plus LoRA on
the attention ``q_proj``/``v_proj`` and trainable RMSNorm-style weights. The default size
(48 × 256) gives 73,728 expert adapter tensors, 74,016 trainable tensors in all.

It then times, interleaved and repeated, in one process:

* ``loraplus``  — ``loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4, weight_decay=0.01)``
* ``bare``      — ``torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)``
* ``peft``      — ``peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4,
  loraplus_lr_ratio=16, weight_decay=0.01)`` (when PEFT is installed; it accepts any
  ``nn.Module``: it only walks ``named_parameters`` and ``named_children``)

and prints medians and the ratios ``loraplus / bare`` (target ≤ 2) and ``peft / loraplus``
(target ≥ 20). Results go to ``benchmarks/results/construction.json``.

Usage::

    python benchmarks/bench_construction.py            # full size, ~2-3 minutes (PEFT dominates)
    python benchmarks/bench_construction.py --layers 4 --experts 16 --repeat 3   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

try:
    import loraplus
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import loraplus

RESULTS = Path(__file__).resolve().parent / "results"


class LoraLinear(nn.Module):
    """A PEFT-style LoRA linear layer (hand-built: same parameter names as peft.tuners.lora.Linear)."""

    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=False)
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})


class Expert(nn.Module):
    def __init__(self, d: int, d_ff: int, r: int) -> None:
        super().__init__()
        self.gate_proj = LoraLinear(d, d_ff, r)
        self.up_proj = LoraLinear(d, d_ff, r)
        self.down_proj = LoraLinear(d_ff, d, r)


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class Layer(nn.Module):
    def __init__(self, d: int, d_ff: int, r: int, experts: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = LoraLinear(d, d, r)
        self.self_attn.v_proj = LoraLinear(d, d, r)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(d, experts, bias=False)
        self.mlp.gate.weight.requires_grad_(False)
        self.mlp.experts = nn.ModuleList([Expert(d, d_ff, r) for _ in range(experts)])


class MoEModel(nn.Module):
    def __init__(self, layers: int, experts: int, d: int, d_ff: int, r: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(d, d_ff, r, experts) for _ in range(layers)])


def build_model(layers: int, experts: int, d: int = 64, d_ff: int = 32, r: int = 8) -> nn.Module:
    """The MoE LoRA model on the meta device, wrapped in PEFT's ``base_model.model.`` prefix."""
    with torch.device("meta"):
        inner = MoEModel(layers, experts, d, d_ff, r)
    outer = nn.Module()
    outer.base_model = nn.Module()
    outer.base_model.model = inner
    return outer


def _time(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of loraplus and bare AdamW")
    parser.add_argument("--peft-repeat", type=int, default=1, help="repetitions of PEFT's function (slow)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's create_loraplus_optimizer")
    parser.add_argument("--out", type=Path, default=RESULTS / "construction.json")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model = build_model(args.layers, args.experts)
    build_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    roles = loraplus.classify(model)
    n_adapters = sum(r in (loraplus.Role.A, loraplus.Role.B) for r in roles.values())
    print(
        f"model: {args.layers} layers x {args.experts} experts, {len(trainable):,} trainable tensors "
        f"({n_adapters:,} LoRA factors), built on meta in {build_s:.1f} s",
        file=sys.stderr,
    )

    def run_loraplus() -> Any:
        return loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4, weight_decay=0.01)

    def run_bare() -> Any:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # sanity: LoRA+ groups cover every trainable tensor exactly once
    opt = run_loraplus()
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    del opt

    times: dict[str, list[float]] = {"loraplus": [], "bare": []}
    run_bare(), run_loraplus()  # warm-up
    for i in range(args.repeat):  # interleaved, alternating order
        order = [("bare", run_bare), ("loraplus", run_loraplus)]
        for key, fn in order if i % 2 == 0 else order[::-1]:
            times[key].append(_time(fn))
        print(f"  rep {i + 1}/{args.repeat}: bare {times['bare'][-1]:.3f} s, loraplus {times['loraplus'][-1]:.3f} s",
              file=sys.stderr)

    peft_version = None
    if not args.no_peft:
        try:
            import peft
            from peft.optimizers import create_loraplus_optimizer
        except ImportError:
            print("PEFT not installed: skipping create_loraplus_optimizer", file=sys.stderr)
        else:
            peft_version = peft.__version__
            times["peft"] = []
            for i in range(args.peft_repeat):
                times["peft"].append(
                    _time(lambda: create_loraplus_optimizer(
                        model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, weight_decay=0.01
                    ))
                )
                print(f"  peft rep {i + 1}/{args.peft_repeat}: {times['peft'][-1]:.2f} s", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    # each repetition times bare and loraplus back to back, so the ratio within a repetition
    # cancels most of the load from other processes on a shared machine
    per_rep = [lp / b for lp, b in zip(times["loraplus"], times["bare"])]
    ratios = {
        "loraplus_over_bare": med["loraplus"] / med["bare"],
        "loraplus_over_bare_median_of_pairs": statistics.median(per_rep),
    }
    if "peft" in med:
        ratios["peft_over_loraplus"] = med["peft"] / med["loraplus"]
    result = {
        "benchmark": "construction",
        "command": "python benchmarks/bench_construction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {
            "layers": args.layers,
            "experts": args.experts,
            "trainable_tensors": len(trainable),
            "lora_factors": n_adapters,
            "device": "meta",
        },
        "seconds": times,
        "loraplus_over_bare_per_repetition": per_rep,
        "median_s": med,
        "ratios": ratios,
        "targets": {"loraplus_over_bare_max": 2.0, "peft_over_loraplus_min": 20.0},
        "versions": {"torch": torch.__version__, "loraplus": loraplus.__version__, "peft": peft_version,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
    }

    print(f"\n{'optimizer construction':<44}{'median s':>10}{'x bare':>9}")
    rows = [("bare torch.optim.AdamW (1 group)", "bare"), ("loraplus.LoraPlus(AdamW)", "loraplus"),
            ("peft create_loraplus_optimizer(AdamW)", "peft")]
    for label, key in rows:
        if key in med:
            print(f"{label:<44}{med[key]:>10.3f}{med[key] / med['bare']:>9.2f}")
    print(f"\nloraplus / bare = {ratios['loraplus_over_bare']:.2f}x (ratio of medians; median of per-repetition "
          f"ratios {ratios['loraplus_over_bare_median_of_pairs']:.2f}x; target <= 2)")
    if "peft_over_loraplus" in ratios:
        print(f"peft / loraplus = {ratios['peft_over_loraplus']:.1f}x (target >= 20)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
