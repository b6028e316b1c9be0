"""Per-step cost and memory of LoRA+ groups: ``opt.step()`` time and optimizer tensor bytes.

A PEFT-named LoRA model (``--layers`` decoder layers × q/k/v/o/up/down projections of width
``--d``, LoRA rank ``--rank``, trainable RMSNorm weights and a head) gets fixed random
gradients; then, for AdamW with ``foreach=True`` and with ``fused=True``, three optimizers over
the same parameters are stepped in interleaved repetitions:

* ``loraplus`` — ``loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4, weight_decay=0.01, ...)``
  (groups A, B, other, other.no_decay)
* ``one_group`` — ``torch.optim.AdamW(trainable params, lr=1e-4, weight_decay=0.01, ...)``
* ``hand`` — ``torch.optim.AdamW`` over hand-written groups (A at lr, B at 16·lr, the rest,
  no-decay at weight_decay 0), what a user would write without the library
* ``loraplus_no_guard`` — ``loraplus.LoraPlus(..., guard=None)``: the same groups without the ratio
  guard, so ``loraplus / loraplus_no_guard`` is the guard's cost per step (its target: not
  measurable above noise, at most 1 % of a step). The guard's check alone is also timed on its own
  (``guard_check_seconds``), as a share of the median step.

Reported: the median time per ``opt.step()`` of each and the ratios ``loraplus / one_group``,
``loraplus / hand`` and ``loraplus / loraplus_no_guard``; and the bytes of every tensor the optimizer holds (state plus the
tensors its param groups reference), which must be identical — LoRA+ only changes
hyper-parameters per group, it adds no tensor memory. Results go to
``benchmarks/perf/results/step.json``.

Usage::

    python -m benchmarks.perf.step                 # ~1-2 minutes on 2 CPU cores
    python -m benchmarks.perf.step --layers 2 --repeat 3 --steps 5 --out /tmp/step.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import loraplus
from benchmarks.common.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results"
RATIO, LR, WD = 16.0, 1e-4, 0.01


class LoraLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


def build_model(layers: int, d: int, rank: int) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(layers):
        layer = nn.Module()
        layer.input_layernorm = RMSNorm(d)
        layer.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, LoraLinear(d, d, rank))
        layer.post_attention_layernorm = RMSNorm(d)
        layer.mlp = nn.Module()
        layer.mlp.up_proj = LoraLinear(d, 4 * d, rank)
        layer.mlp.down_proj = LoraLinear(4 * d, d, rank)
        model.layers.append(layer)
    model.norm = RMSNorm(d)
    model.score = nn.Linear(d, 8)
    return model


def hand_groups(model: nn.Module) -> list[dict[str, Any]]:
    """What a user writes by hand: the same lrs and decay as LoRA+'s groups, without the library."""
    a, b, other, no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_A" in name:
            a.append(p)
        elif "lora_B" in name:
            b.append(p)
        elif name.endswith("bias") or "norm" in name:
            no_decay.append(p)
        else:
            other.append(p)
    return [
        {"params": a, "lr": LR, "weight_decay": WD},
        {"params": b, "lr": RATIO * LR, "weight_decay": WD},
        {"params": other, "lr": LR, "weight_decay": WD},
        {"params": no_decay, "lr": LR, "weight_decay": 0.0},
    ]


def tensor_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer's state tensors and of the (distinct) tensors its groups reference."""
    state = 0
    for per_param in opt.state.values():
        for value in per_param.values():
            if torch.is_tensor(value):
                state += value.numel() * value.element_size()
    seen: dict[int, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            seen[id(p)] = p
        for key, value in group.items():
            if key != "params" and torch.is_tensor(value):
                seen[id(value)] = value
    params = sum(t.numel() * t.element_size() for t in seen.values())
    return {"state_bytes": state, "param_group_bytes": params, "total_bytes": state + params}


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="opt.step() calls per timed repetition")
    ap.add_argument("--repeat", type=int, default=15, help="interleaved repetitions per optimizer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "step.json")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args.layers, args.d, args.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p) * 1e-3
    n_elems = sum(p.numel() for p in trainable)
    print(f"model: {len(trainable)} trainable tensors, {n_elems:,} trainable elements", file=sys.stderr)

    results: dict[str, Any] = {}
    for impl in ("foreach", "fused"):
        kw = {impl: True}
        factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
            "loraplus": lambda kw=kw: loraplus.LoraPlus(torch.optim.AdamW, model, ratio=RATIO, lr=LR, weight_decay=WD, **kw),
            "one_group": lambda kw=kw: torch.optim.AdamW(trainable, lr=LR, weight_decay=WD, **kw),
            "hand": lambda kw=kw: torch.optim.AdamW(hand_groups(model), lr=LR, **kw),
            "loraplus_no_guard": lambda kw=kw: loraplus.LoraPlus(
                torch.optim.AdamW, model, ratio=RATIO, lr=LR, weight_decay=WD, guard=None, **kw
            ),
        }
        opts = {k: f() for k, f in factories.items()}
        guard = loraplus.groups.guard(opts["loraplus"])
        assert guard is not None and loraplus.groups.guard(opts["loraplus_no_guard"]) is None
        for opt in opts.values():  # initialise state (and warm up kernels)
            for _ in range(2):
                opt.step()
        lp_groups = {g["name"]: (g["lr"], g.get("weight_decay")) for g in opts["loraplus"].param_groups}
        hand = opts["hand"].param_groups
        assert lp_groups == {
            "A": (hand[0]["lr"], WD), "B": (hand[1]["lr"], WD), "other": (LR, WD), "other.no_decay": (LR, 0.0)
        }, lp_groups
        assert [len(g["params"]) for g in opts["loraplus"].param_groups] == [len(g["params"]) for g in hand]
        times: dict[str, list[float]] = {k: [] for k in opts}
        keys = list(opts)
        with torch.no_grad():
            for rep in range(args.repeat):
                order = keys[rep % len(keys):] + keys[: rep % len(keys)]  # rotate who goes first
                for key in order:
                    opt = opts[key]
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        opt.step()
                    times[key].append((time.perf_counter() - t0) / args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: tensor_bytes(o) for k, o in opts.items()}
        # the guard's own work, alone: what the pre-hook runs before each step
        n_checks = 2000
        t0 = time.perf_counter()
        for _ in range(n_checks):
            assert not guard.check(opts["loraplus"])
        check_s = (time.perf_counter() - t0) / n_checks
        results[impl] = {
            "step_seconds": times,
            "median_step_s": med,
            "ratios": {
                "loraplus_over_one_group": med["loraplus"] / med["one_group"],
                "loraplus_over_hand": med["loraplus"] / med["hand"],
                "loraplus_over_loraplus_no_guard": med["loraplus"] / med["loraplus_no_guard"],
            },
            "guard_check_seconds": check_s,
            "guard_check_share_of_step": check_s / med["loraplus"],
            "guard_target_share": 0.01,
            "guard_target_met": check_s / med["loraplus"] <= 0.01,
            # within one repetition the three ran back to back: their ratio cancels most of the
            # load of other processes; median and range over the repetitions
            "per_repetition_ratios": {
                name: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
                for name, v in (
                    ("loraplus_over_one_group", [a / b for a, b in zip(times["loraplus"], times["one_group"])]),
                    ("loraplus_over_hand", [a / b for a, b in zip(times["loraplus"], times["hand"])]),
                    (
                        "loraplus_over_loraplus_no_guard",
                        [a / b for a, b in zip(times["loraplus"], times["loraplus_no_guard"])],
                    ),
                )
            },
            "memory": mem,
            "extra_tensor_bytes_vs_one_group": mem["loraplus"]["total_bytes"] - mem["one_group"]["total_bytes"],
            "extra_tensor_bytes_vs_hand": mem["loraplus"]["total_bytes"] - mem["hand"]["total_bytes"],
        }
        print(f"\nAdamW({impl}=True)        median ms/step   x one group   optimizer tensor bytes")
        for key, label in (
            ("one_group", "one group"),
            ("hand", "hand-written groups"),
            ("loraplus_no_guard", "LoraPlus(guard=None)"),
            ("loraplus", "loraplus.LoraPlus"),
        ):
            print(
                f"  {label:<22}{1e3 * med[key]:>12.3f}{med[key] / med['one_group']:>14.3f}"
                f"{mem[key]['total_bytes']:>24,}"
            )
        r = results[impl]["per_repetition_ratios"]
        print("  per repetition: " + ", ".join(
            f"{name.replace('_over_', ' / ').replace('_', ' ')} {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
            for name, v in r.items()) + f"; extra tensor bytes = {results[impl]['extra_tensor_bytes_vs_one_group']}")
        print(f"  guard check alone: {1e6 * check_s:.1f} µs = {100 * check_s / med['loraplus']:.3f} % of a step")

    out = {
        "benchmark": "step",
        **provenance(argv, module="benchmarks.perf.step"),
        "model": {"layers": args.layers, "d": args.d, "rank": args.rank, "trainable_tensors": len(trainable),
                  "trainable_elements": n_elems},
        "steps_per_repeat": args.steps,
        "repeat": args.repeat,
        "threads": args.threads,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
