"""Construction time of a LoRA+ optimizer on mixture-of-experts LoRA models of several sizes.

Builds, on the meta device (no memory, no data), a decoder with ``--layers`` layers of
``--experts`` experts, each expert an MLP whose ``gate_proj``/``up_proj``/``down_proj`` carry a
PEFT-named LoRA adapter (``…lora_A.default.weight`` / ``…lora_B.default.weight``), plus LoRA on
the attention ``q_proj``/``v_proj`` and trainable RMSNorm-style weights. The default size
(48 × 256) gives 73,728 expert adapter tensors, 74,016 trainable tensors in all; the sizes
run by default are 48 layers × {4, 16, 64, 256} experts: 1,440 to 74,016 trainable tensors.

For each size it times, interleaved (each repetition runs every method once, rotating the
order) and repeated, in one process:

* ``loraplus``  — ``loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4, weight_decay=0.01)``
* ``bare``      — ``torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)``
* ``peft``      — ``peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4,
  loraplus_lr_ratio=16, weight_decay=0.01)`` (when PEFT is installed; it accepts any
  ``nn.Module``: it only walks ``named_parameters`` and ``named_children``)

and prints medians, the per-repetition ratios ``loraplus / bare`` and ``peft / loraplus``
(median and range), and the log–log slope of each method's median time against the number of
trainable tensors (1 = linear, 2 = quadratic). Results go to
``benchmarks/perf/results/construction.json``.

Usage::

    python -m benchmarks.perf.construction            # 4 sizes, ~10 minutes (PEFT at 74k dominates)
    python -m benchmarks.perf.construction --layers 4 --experts 4 16 --repeat 3   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): 1 = linear, 2 = quadratic."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure(layers: int, experts: int, repeat: int, peft_repeat: int, use_peft: bool) -> dict[str, Any]:
    """Time the three constructions on one model size, interleaved in rotating order."""
    t0 = time.perf_counter()
    model = build_model(layers, experts)
    build_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    roles = loraplus.classify(model)
    n_adapters = sum(r in (loraplus.Role.A, loraplus.Role.B) for r in roles.values())
    print(f"model: {layers} layers x {experts} experts, {len(trainable):,} trainable tensors "
          f"({n_adapters:,} LoRA factors), built on meta in {build_s:.1f} s", file=sys.stderr)

    fns: dict[str, Callable[[], Any]] = {
        "bare": lambda: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
        "loraplus": lambda: loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4, weight_decay=0.01),
    }
    if use_peft:
        from peft.optimizers import create_loraplus_optimizer

        fns["peft"] = lambda: create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, weight_decay=0.01)
    # sanity: LoRA+ groups cover every trainable tensor exactly once
    opt = fns["loraplus"]()
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    del opt
    fns["bare"](), fns["loraplus"]()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeat):  # interleaved: every repetition runs each method once, in rotating order
        order = keys[i % len(keys):] + keys[: i % len(keys)]
        for key in order:
            if key == "peft" and i >= peft_repeat:
                continue
            times[key].append(_time(fns[key]))
        print(f"  rep {i + 1}/{repeat}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if v),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_rep = [lp / b for lp, b in zip(times["loraplus"], times["bare"])]
    out: dict[str, Any] = {
        "layers": layers, "experts": experts, "trainable_tensors": len(trainable), "lora_factors": n_adapters,
        "seconds": times, "median_s": med,
        "loraplus_over_bare_per_repetition": per_rep,
        "loraplus_over_bare": {"median": statistics.median(per_rep), "min": min(per_rep), "max": max(per_rep)},
    }
    if "peft" in times:
        per = [p / lp for p, lp in zip(times["peft"], times["loraplus"])]
        out["peft_over_loraplus_per_repetition"] = per
        out["peft_over_loraplus"] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    return out


#: The issue's goal for LoraPlus construction at the largest size, as a multiple of a bare single-group AdamW.
TARGET_OVER_BARE = 1.25


def breakdown(layers: int, experts: int, repeat: int) -> dict[str, Any]:
    """Where LoraPlus's construction time goes, stage by stage, interleaved with the bare walk (CPU time).

    ``parameters_walk`` is what a bare AdamW's ``model.parameters()`` costs; ``walk`` is loraplus's one
    walk of the model (modules by name and parameters), ``labels`` the labelling after it (its walk
    included), ``groups`` labels plus grouping and the partner warning, ``optimizer`` torch's AdamW
    over ready groups.
    """
    from loraplus._groups._build import prepare
    from loraplus._labels import label_model, walk

    model = build_model(layers, experts)
    groups = prepare(model, lr=1e-4, ratio=16, weight_decay=0.01)[1]
    stages: dict[str, Callable[[], Any]] = {
        "parameters_walk": lambda: [p for p in model.parameters() if p.requires_grad],
        "walk": lambda: walk(model),
        "labels": lambda: label_model(model),
        "groups": lambda: prepare(model, lr=1e-4, ratio=16, weight_decay=0.01),
        "optimizer": lambda: torch.optim.AdamW(groups, lr=1e-4),
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(repeat):
        for key, fn in stages.items():
            gc.collect()
            t0 = time.process_time()
            fn()
            times[key].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"layers": layers, "experts": experts, "cpu_seconds_median": med, "cpu_seconds": times}


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64, 256],
                        help="experts per layer, one model size each (48 layers: 1,440 to 74,016 trainable tensors)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repetitions per size")
    ap.add_argument("--peft-repeat", type=int, default=3, help="how many of those repetitions include PEFT (slow)")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's create_loraplus_optimizer")
    ap.add_argument("--out", type=Path, default=RESULTS / "construction.json")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    use_peft = not args.no_peft
    if use_peft:
        try:
            import peft
        except ImportError:
            print("PEFT not installed: skipping create_loraplus_optimizer", file=sys.stderr)
            use_peft = False
        else:
            print(f"PEFT {peft.__version__}", file=sys.stderr)
    t0 = time.perf_counter()
    sizes = [measure(args.layers, e, args.repeat, args.peft_repeat, use_peft) for e in args.experts]
    n = [s["trainable_tensors"] for s in sizes]
    slopes = {}
    for key in sizes[0]["median_s"]:
        ys = [s["median_s"][key] for s in sizes]
        slopes[key] = {"all_sizes": loglog_slope(n, ys) if len(n) > 1 else None,
                       "two_largest": loglog_slope(n[-2:], ys[-2:]) if len(n) > 1 else None}
    result = {
        "benchmark": "construction",
        **provenance(argv, module="benchmarks.perf.construction"),
        "model": "MoE LoRA on the meta device, 48 layers x experts, PEFT names under base_model.model.",
        "sizes": sizes,
        "loglog_slope": slopes,
    }
    largest = sizes[-1]["loraplus_over_bare"]["median"]
    result["target"] = {
        "loraplus_over_bare_at_largest": TARGET_OVER_BARE, "measured": largest, "met": largest <= TARGET_OVER_BARE,
        "stages": breakdown(args.layers, args.experts[-1], args.repeat),
    }
    result["seconds_total"] = time.perf_counter() - t0
    print(f"\n{'trainable tensors':>18}" + "".join(f"{k + ' s':>12}" for k in sizes[0]["median_s"])
          + f"{'lp/bare':>18}{'peft/lp':>22}")
    for s in sizes:
        lb = s["loraplus_over_bare"]
        pl = s.get("peft_over_loraplus")
        print(f"{s['trainable_tensors']:>18,}" + "".join(f"{v:>12.4f}" for v in s["median_s"].values())
              + f"{lb['median']:>8.2f} ({lb['min']:.2f}-{lb['max']:.2f})"
              + (f"{pl['median']:>10.1f} ({pl['min']:.1f}-{pl['max']:.1f})" if pl else ""))
    print("log-log slope of median time vs trainable tensors (1 = linear, 2 = quadratic): "
          + ", ".join(f"{k} {v['all_sizes']:.2f} (two largest sizes {v['two_largest']:.2f})" for k, v in slopes.items()))
    med = result["target"]["stages"]["cpu_seconds_median"]
    print("stages at the largest size (CPU s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print(f"target {TARGET_OVER_BARE}x a bare AdamW: measured {largest:.2f}x, "
          f"{'met' if result['target']['met'] else 'not met'}")
    print(f"total {result['seconds_total']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
