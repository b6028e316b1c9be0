"""Step-time overhead of loraplus.Monitor, side by side with an unmonitored run in one process.

A PEFT LoRA model with ``--layers`` adapted Linear layers (default 128, width 256, r 8) trains
with LoRA+ AdamW. Each round runs one block of ``--block`` full training steps (forward,
backward, ``optimizer.step()``) per configuration — unmonitored, ``every=1``, ``every=10``,
``every=10`` with activation terms — in a rotating order, so CPU noise hits all of them alike.
Reported: the median per-step time of each configuration and its overhead, both as the ratio
of medians and as the median of the per-round paired ratios (block / unmonitored block of the
same round). Results go to ``benchmarks/results/monitor_overhead.json``.

    python benchmarks/bench_monitor.py              # ~2 minutes on 2 shared CPU cores
    python benchmarks/bench_monitor.py --rounds 5   # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import loraplus


class Stack(nn.Module):
    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


CONFIGS = {
    "unmonitored": None,
    "every=1": dict(every=1),
    "every=10": dict(every=10),
    "every=10,activations": dict(every=10, activations=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block", type=int, default=20, help="steps per block (a multiple of 10)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor_overhead.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model = get_peft_model(
        Stack(args.layers, args.width), LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["layers." + str(i) for i in range(args.layers)])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4)
    x = torch.randn(args.batch, args.width)

    def block(cfg: dict | None) -> float:
        mon = loraplus.Monitor(opt, model, **cfg) if cfg is not None else None
        t0 = time.perf_counter()
        for _ in range(args.block):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = (time.perf_counter() - t0) / args.block
        if mon is not None:
            assert len(mon.records) == args.layers * -(-args.block // cfg["every"])
            mon.close()
        return dt

    n_pairs = len(loraplus.Monitor(opt, model).pairs)
    for cfg in CONFIGS.values():  # warm-up
        block(cfg)
    names = list(CONFIGS)
    times: dict[str, list[float]] = {k: [] for k in names}
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            times[name].append(block(CONFIGS[name]))
    load_after = os.getloadavg()

    base = times["unmonitored"]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} logical CPUs (shared), {platform.system()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"PEFT LoRA MLP, {n_pairs} adapted Linear({args.width},{args.width}) layers, r={args.rank}, "
        f"batch {args.batch}, AdamW LoRA+ ratio 16",
        "block_steps": args.block,
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "configs": {},
    }
    print(f"{result['model']}; {args.rounds} rounds x {args.block} steps per config; loadavg {load_before[0]:.2f}")
    print(f"{'config':<22} {'median ms/step':>15} {'ratio of medians':>17} {'median paired ratio':>20}")
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], base))
        ratio = med / statistics.median(base)
        result["configs"][name] = {
            "median_step_ms": med * 1e3,
            "ratio_of_medians": ratio,
            "median_paired_ratio": paired,
            "step_ms_per_round": [t * 1e3 for t in times[name]],
        }
        print(f"{name:<22} {med * 1e3:>15.2f} {ratio:>17.3f} {paired:>20.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
