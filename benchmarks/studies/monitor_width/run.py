"""The paper's width claim, measured with loraplus.Monitor, and a per-layer example from a real run.

1. Width sweep (``docs/img/monitor_width_sweep.png``): the toy model of Hayou et al. (2024, §3.2),
   f(x) = W_out·ReLU(B·A·ReLU(W_in·x)), d = 5, r = 4, A ~ N(0, 1/n), B ~ N(0, 1), trained on
   y = sin(mean(x)) with Adam (full batch) for a few steps at widths n = 64 … 4096. The Monitor
   (``activations=True``) records the A-side term RMS(B·ΔA·x) and the B-side term RMS(ΔB·A·x) on
   every step. With one shared learning rate (λ = 1) or a fixed λ their ratio grows with width
   (A-side dominates, B learns too slowly); with λ ∝ width (λ = n/64) it stays in a constant band.
2. Real run (``docs/img/monitor_example.png``): all-MiniLM-L6-v2 with PEFT LoRA on query/value
   (12 adapters), fine-tuned with LoRA+ (λ = 16) and with λ = 1 on the ``order`` task of
   ``benchmarks/common/minilm.py``; the Monitor's own ``plot()`` of the λ = 16 run, and both runs'
   ``summary()`` printed and saved.

Numbers go to ``benchmarks/studies/monitor_width/results/monitor_width_sweep.json``.

    python -m benchmarks.studies.monitor_width.run            # ~2 minutes on 2 shared CPU cores
    python -m benchmarks.studies.monitor_width.run --no-real  # the width sweep only
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn

import loraplus
from benchmarks import DOCS_IMG
from benchmarks.common.provenance import provenance

IMG = DOCS_IMG
RESULTS = Path(__file__).resolve().parent / "results"


class Adapter(nn.Module):
    """h -> B·A·h, the paper's init: A ~ N(0, 1/n), B ~ N(0, 1)."""

    def __init__(self, n: int, r: int, g: torch.Generator):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, n, generator=g) / n**0.5)
        self.lora_B = nn.Parameter(torch.randn(n, r, generator=g))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.lora_A.t() @ self.lora_B.t()


class Toy(nn.Module):
    def __init__(self, n: int, d: int = 5, r: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = nn.Parameter(torch.randn(n, d, generator=g), requires_grad=False)
        self.w_out = nn.Parameter(torch.randn(1, n, generator=g) / n**0.5, requires_grad=False)
        self.adapter = Adapter(n, r, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.adapter(torch.relu(x @ self.w_in.t()))) @ self.w_out.t()


def toy_run(n: int, ratio: float, seed: int, steps: int, lr: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(1000, 5, generator=g)
    y = torch.sin(x.mean(1, keepdim=True))
    model = Toy(n, seed=seed)
    opt = loraplus.LoraPlus(torch.optim.Adam, model, ratio=ratio, lr=lr)
    with loraplus.Monitor(opt, model, activations=True) as mon:
        for _ in range(steps):
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
    a = statistics.median(r["act_B_dA"] for r in mon.records)
    b = statistics.median(r["act_dB_A"] for r in mon.records)
    ratio_med = statistics.median(r["act_B_dA"] / r["act_dB_A"] for r in mon.records)
    return {"A_side": a, "B_side": b, "ratio": ratio_med}


def width_sweep(args: argparse.Namespace) -> dict:
    widths = [64, 128, 256, 512, 1024, 2048, 4096]
    schemes = {
        "λ = 1 (one shared lr)": lambda n: 1.0,
        "λ = 16 (fixed)": lambda n: 16.0,
        "λ = n/64 (∝ width)": lambda n: n / 64,
    }
    out: dict = {"widths": widths, "seeds": args.seeds, "steps": args.steps, "lr": args.lr, "schemes": {}}
    for name, lam in schemes.items():
        rows = []
        for n in widths:
            runs = [toy_run(n, lam(n), s, args.steps, args.lr) for s in range(args.seeds)]
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row["ratio_min"] = min(r["ratio"] for r in runs)
            row["ratio_max"] = max(r["ratio"] for r in runs)
            rows.append(row)
            a_side, b_side = row["A_side"], row["B_side"]
            print(f"{name:<24} n={n:<5} A-side {a_side:.3g}  B-side {b_side:.3g}  ratio {row['ratio']:.3g}")
        out["schemes"][name] = rows
    out["drift"] = {}
    for name, rows in out["schemes"].items():
        r = [row["ratio"] for row in rows]
        out["drift"][name] = max(r) / min(r)
        print(f"{name}: max/min ratio over widths = {max(r) / min(r):.3g}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for (name, rows), color in zip(out["schemes"].items(), ("C3", "C1", "C0")):
        ax1.plot(widths, [r["ratio"] for r in rows], "o-", color=color, label=name)
        lo, hi = [r["ratio_min"] for r in rows], [r["ratio_max"] for r in rows]
        ax1.fill_between(widths, lo, hi, color=color, alpha=0.15)
        ax2.plot(widths, [r["A_side"] for r in rows], "o-", color=color, label=f"A-side, {name}")
        ax2.plot(widths, [r["B_side"] for r in rows], "s--", color=color, label=f"B-side, {name}")
    ax1.set(xscale="log", yscale="log", xlabel="width n", ylabel="RMS(B·ΔA·x) / RMS(ΔB·A·x)")
    ax1.set_title("A-side / B-side feature update, measured by loraplus.Monitor")
    ax1.legend(fontsize=8)
    ax2.set(xscale="log", yscale="log", xlabel="width n", ylabel="RMS per output coordinate")
    ax2.set_title("the two terms (median over steps and seeds)")
    ax2.legend(fontsize=6.5, ncol=1)
    fig.suptitle(
        f"Paper toy (d=5, r=4), Adam lr(A)={args.lr:g}, {args.steps} full-batch steps, "
        f"{args.seeds} seeds (band = min..max)"
    )
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "monitor_width_sweep.png", dpi=110)
    print(f"saved {IMG / 'monitor_width_sweep.png'}")
    return out


def real_run(args: argparse.Namespace) -> dict:
    from benchmarks.common import minilm as mm

    torch.set_num_threads(1)
    out: dict = {}
    for ratio in (16.0, 1.0):
        model = mm.adapted_model("lora", "B0", mm.QV, seed=0)
        opt = loraplus.LoraPlus(
            torch.optim.AdamW,
            model,
            ratio=ratio,
            lr=args.real_lr,
            role_lr={loraplus.Role.OTHER: mm.HEAD_LR},
            betas=(0.9, 0.99),
        )
        train_idx, _ = mm.split("order")
        gen = torch.Generator().manual_seed(0)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        with loraplus.Monitor(opt, model, every=args.every, activations=True) as mon:
            for step in range(args.real_steps):
                lo = (step * mm.BATCH) % (len(train_idx) - mm.BATCH)
                x, y = mm.make_batch("order", train_idx[lo : lo + mm.BATCH], gen)
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        text = mon.summary()
        print(f"\n--- MiniLM q/v LoRA, λ = {ratio:g}, lr(A) = {args.real_lr:g}, {args.real_steps} steps ---\n{text}")
        out[f"ratio={ratio:g}"] = {"summary": text, "adapters": len(mon.pairs), "records": len(mon.records)}
        if ratio == 16.0:
            fig = mon.plot(IMG / "monitor_example.png")
            fig.suptitle(
                f"all-MiniLM-L6-v2, PEFT LoRA r=8 on query/value, LoRA+ λ=16, AdamW lr(A)={args.real_lr:g}: "
                f"every {args.every} steps"
            )
            fig.savefig(IMG / "monitor_example.png", dpi=110)
            print(f"saved {IMG / 'monitor_example.png'}")
    return out


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-real", action="store_true", help="skip the MiniLM run")
    ap.add_argument("--no-sweep", action="store_true", help="skip the width sweep")
    ap.add_argument("--real-steps", type=int, default=150)
    ap.add_argument("--real-lr", type=float, default=2e-4)
    ap.add_argument("--every", type=int, default=5)
    return ap


def main() -> None:
    args = parser().parse_args()
    path = RESULTS / "monitor_width_sweep.json"
    result = json.loads(path.read_text()) if path.exists() else {}  # keep the part not rerun
    prov = provenance(module="benchmarks.studies.monitor_width.run")
    if not args.no_sweep:  # each part records the command that produced it (a partial rerun keeps the other)
        result["width_sweep"] = {**prov, **width_sweep(args)}
    if not args.no_real:
        result["real_run"] = {**prov, **real_run(args)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
