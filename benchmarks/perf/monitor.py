"""Step-time overhead of loraplus.Monitor, side by side with an unmonitored run in one process.

A PEFT LoRA model with ``--layers`` adapted Linear layers (default 128, width 128, r 8,
batch 32) trains with LoRA+ AdamW. Each round runs one block of ``--block`` full training steps (forward,
backward, ``optimizer.step()``) per configuration — unmonitored, ``every=1``, ``every=10``,
``every=10`` with activation terms — in a rotating order, so CPU noise hits all of them alike.
Reported, for the process's CPU time (robust on a shared machine: time spent waiting for a
core is not counted; one torch thread by default, so no spinning thread pool counts either) and
for wall-clock time: the median per-step time of each configuration and its overhead, both as
the ratio of medians and as the median of the per-round paired ratios (block / unmonitored
block of the same round). Results go to ``benchmarks/perf/results/monitor_overhead.json``.

    python -m benchmarks.perf.monitor              # a few minutes on 2 shared CPU cores
    python -m benchmarks.perf.monitor --rounds 5   # quicker, noisier
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
from benchmarks.common.provenance import provenance


def summarize(result: dict) -> dict:
    """What the Monitor page quotes, per configuration and clock, from the per-round step times.

    The unmonitored step's median and range (ms), the overhead in per cent as a ratio of medians
    and as the median of the per-round paired ratios, and those paired ratios' quartiles.
    """
    out: dict = {}
    for name, clocks in result["configs"].items():
        out[name] = {}
        for clock, entry in clocks.items():
            vals = entry["step_ms_per_round"]
            base = result["configs"]["unmonitored"][clock]["step_ms_per_round"]
            paired = [t / b for t, b in zip(vals, base)]
            q1, _, q3 = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
            out[name][clock] = {
                "median_ms": statistics.median(vals), "min_ms": min(vals), "max_ms": max(vals),
                "overhead_pct": 100 * (entry["ratio_of_medians"] - 1),
                "paired_overhead_pct": 100 * (entry["median_paired_ratio"] - 1),
                "paired_q1_pct": 100 * (q1 - 1), "paired_q3_pct": 100 * (q3 - 1),
            }
    return out


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


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=20, help="steps per block (a multiple of 10)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor_overhead.json"))
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = get_peft_model(
        Stack(args.layers, args.width),
        LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=[f"layers.{i}" for i in range(args.layers)]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4)
    x = torch.randn(args.batch, args.width)

    def block(cfg: dict | None) -> tuple[float, float]:
        """Wall-clock and process CPU seconds per step over one block of training steps."""
        mon = loraplus.Monitor(opt, model, **cfg) if cfg is not None else None
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.block):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        wall, cpu = (time.perf_counter() - w0) / args.block, (time.process_time() - c0) / args.block
        if mon is not None:
            assert len(mon.records) == args.layers * -(-args.block // cfg["every"])
            mon.close()
        return wall, cpu

    n_pairs = len(loraplus.Monitor(opt, model).pairs)
    for cfg in CONFIGS.values():  # warm-up
        block(cfg)
    names = list(CONFIGS)
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in names}
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            wall, cpu = block(CONFIGS[name])
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    load_after = os.getloadavg()

    result = {
        **provenance(module="benchmarks.perf.monitor"),
        "machine_summary": f"{platform.machine()} {os.cpu_count()} logical CPUs (shared), {platform.system()}",
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
    print(f"{result['model']}; {args.rounds} rounds x {args.block} steps per config, {result['threads']} thread(s)")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'config':<22} {'clock':<5} {'median ms/step':>15} {'ratio of medians':>17} {'median paired ratio':>20}")
    for name in names:
        entry: dict = {}
        for clock in ("cpu", "wall"):
            vals, base = times[name][clock], times["unmonitored"][clock]
            med = statistics.median(vals)
            ratio = med / statistics.median(base)
            paired = statistics.median(t / b for t, b in zip(vals, base))
            entry[clock] = {
                "median_step_ms": med * 1e3,
                "ratio_of_medians": ratio,
                "median_paired_ratio": paired,
                "step_ms_per_round": [t * 1e3 for t in vals],
            }
            print(f"{name:<22} {clock:<5} {med * 1e3:>15.2f} {ratio:>17.3f} {paired:>20.3f}")
        result["configs"][name] = entry
    result["summary"] = summarize(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
