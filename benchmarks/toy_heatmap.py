"""The LoRA+ paper's toy model: loss over a grid of (η_A, η_B) at t=10 and t=200 steps.

Setup (Hayou, Ghosh, Yu 2024, §3.2): f(x) = W_out · ReLU(B · A · ReLU(W_in · x)) with d=5,
n=100, r=4; X ~ N(0, I_5), Y = sin(mean(X)); 1000 training and 100 test points; full-batch
gradient descent on A and B only (A ← A − η_A ∇_A, B ← B − η_B ∇_B) on the mean squared
error; W_in ~ N(0, 1), W_out ~ N(0, 1/n), A ~ N(0, 1/n), B ~ N(0, 1).

Every grid point and seed is trained at once (the grid is a batch dimension), in float32 on a
13 × 13 log grid from 2e-4 to 10.

Usage::

    python benchmarks/toy_heatmap.py            # writes benchmarks/results/toy_heatmap_paper.json
                                                #    and docs/img/toy_heatmap_paper.png
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

D, N, R = 5, 100, 4
N_TRAIN, N_TEST = 1000, 100
STEPS = (10, 200)
SEEDS = (0, 1, 2)
DTYPE = torch.float32
#: A cell is "near-optimal" when its seed-mean test loss is within this factor of the best cell's.
NEAR = 1.25
GRID = [float(v) for v in torch.logspace(math.log10(2e-4), 1.0, 13, dtype=torch.float64)]
ROOT = Path(__file__).resolve().parent.parent


def train(seed: int, grid: list[float] = GRID, steps: tuple[int, ...] = STEPS, init: str = "paper") -> dict[int, dict[str, torch.Tensor]]:
    """Train one seed at every (η_A, η_B) of ``grid`` at once; losses at each step in ``steps``.

    ``init``: only ``"paper"`` (A ~ N(0, 1/n), B ~ N(0, 1)). This toy has no pretrained weight
    under the adapter, so a zero factor (PEFT's B = 0) would feed exactly 0 into the ReLU, whose
    derivative there is 0: nothing would ever train (measured: every grid cell stays at its
    initial loss).

    Returns ``{t: {"train": (len(grid), len(grid)), "test": ...}}`` indexed ``[i_A, i_B]``;
    diverged runs are ``inf``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, D, generator=g, dtype=DTYPE)
    y = torch.sin(x.mean(dim=1))
    w_in = torch.randn(N, D, generator=g, dtype=DTYPE)
    w_out = torch.randn(N, generator=g, dtype=DTYPE) / math.sqrt(N)
    a0 = torch.randn(R, N, generator=g, dtype=DTYPE) / math.sqrt(N)
    b0 = torch.randn(N, R, generator=g, dtype=DTYPE)
    h = torch.relu(x @ w_in.T)  # (samples, n): fixed features
    h_tr, h_te, y_tr, y_te = h[:N_TRAIN], h[N_TRAIN:], y[:N_TRAIN], y[N_TRAIN:]

    k = len(grid)
    eta = torch.tensor(grid, dtype=DTYPE)
    eta_a = eta.repeat_interleave(k).view(-1, 1, 1)  # row-major: index = i_A * k + i_B
    eta_b = eta.repeat(k).view(-1, 1, 1)
    a = a0.expand(k * k, R, N).clone().requires_grad_(True)
    b = b0.expand(k * k, N, R).clone().requires_grad_(True)

    def losses(hh: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        z = torch.relu(torch.matmul(torch.matmul(hh, a.transpose(1, 2)), b.transpose(1, 2)))  # (G, samples, n)
        return ((z @ w_out - yy) ** 2).mean(dim=1)  # (G,)

    out: dict[int, dict[str, torch.Tensor]] = {}
    for t in range(max(steps) + 1):
        if t in steps:
            with torch.no_grad():
                tr, te = losses(h_tr, y_tr), losses(h_te, y_te)
            bad = ~torch.isfinite(tr) | ~torch.isfinite(te)
            tr[bad], te[bad] = math.inf, math.inf
            out[t] = {"train": tr.view(k, k).clone(), "test": te.view(k, k).clone()}
        if t == max(steps):
            break
        loss = losses(h_tr, y_tr)
        ga, gb = torch.autograd.grad(torch.nan_to_num(loss, nan=0.0, posinf=0.0).sum(), (a, b))
        with torch.no_grad():
            a -= eta_a * ga
            b -= eta_b * gb
            # a diverged grid point stays diverged: freeze it at inf so it cannot poison the others
            dead = ~torch.isfinite(loss).view(-1, 1, 1) | (a.abs().amax(dim=(1, 2), keepdim=True) > 1e6)
            a.masked_fill_(dead, math.inf)
            b.masked_fill_(dead, math.inf)
    return out


def summarise(mean: torch.Tensor, grid: list[float]) -> dict[str, float]:
    """Where the seed-averaged loss is lowest, overall and on the diagonal η_A = η_B."""
    k = len(grid)
    flat = int(torch.argmin(torch.nan_to_num(mean, nan=math.inf)))
    ia, ib = divmod(flat, k)
    diag = torch.diagonal(mean)
    jd = int(torch.argmin(torch.nan_to_num(diag, nan=math.inf)))
    near = [(grid[i], grid[j]) for i in range(k) for j in range(k) if float(mean[i, j]) <= NEAR * float(mean[ia, ib])]
    return {
        "near_optimal": near,
        "near_ratio_min": min(b / a for a, b in near),
        "near_ratio_max": max(b / a for a, b in near),
        "best_eta_A": grid[ia],
        "best_eta_B": grid[ib],
        "best_ratio": grid[ib] / grid[ia],
        "best_loss": float(mean[ia, ib]),
        "best_diagonal_eta": grid[jd],
        "best_diagonal_loss": float(diag[jd]),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["grid"]
    k = len(grid)
    fig, axes = plt.subplots(1, len(STEPS), figsize=(5.2 * len(STEPS), 4.4))
    for ax, t in zip(axes, STEPS):
        mean = torch.tensor(result["mean_test"][str(t)])
        import numpy as np

        shown = np.ma.masked_invalid(torch.log10(mean).numpy())  # diverged cells (inf) shown grey
        cmap = matplotlib.colormaps["viridis"].copy()
        cmap.set_bad("lightgrey")
        im = ax.imshow(shown, origin="lower", cmap=cmap, aspect="auto")
        ticks = list(range(0, k, 3))
        ax.set_xticks(ticks, [f"{grid[i]:.0e}" for i in ticks])
        ax.set_yticks(ticks, [f"{grid[i]:.0e}" for i in ticks])
        ax.set_xlabel("η_B")
        ax.set_ylabel("η_A")
        ax.plot([0, k - 1], [0, k - 1], "w--", lw=1, label="η_A = η_B")
        s = result["summary"][str(t)]
        for ea, eb in s["near_optimal"]:
            ax.plot(grid.index(eb), grid.index(ea), "o", mfc="none", mec="red", ms=9)
        ax.plot(grid.index(s["best_eta_B"]), grid.index(s["best_eta_A"]), "r*", ms=14,
                label=f"best: η_B/η_A = {s['best_ratio']:.3g}")
        ax.set_title(f"{result['setup']['init']} init: test loss at t={t} (log10, {len(SEEDS)} seeds)", fontsize=9)
        ax.legend(loc="upper right", fontsize=8, title="grey: diverged", title_fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(init: str = "paper") -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    per_seed = [train(s, init=init) for s in SEEDS]
    result: dict = {
        "setup": {"init": init, "d": D, "n": N, "r": R, "n_train": N_TRAIN, "n_test": N_TEST, "steps": STEPS, "seeds": SEEDS,
                  "command": "python benchmarks/toy_heatmap.py", "machine": "2 shared CPU cores"},
        "grid": GRID,
        "test": {str(t): [r[t]["test"].tolist() for r in per_seed] for t in STEPS},
        "train": {str(t): [r[t]["train"].tolist() for r in per_seed] for t in STEPS},
        "mean_test": {},
        "summary": {},
    }
    for t in STEPS:
        mean = torch.stack([r[t]["test"] for r in per_seed]).mean(dim=0)
        result["mean_test"][str(t)] = mean.tolist()
        result["summary"][str(t)] = summarise(mean, GRID)
    result["setup"]["seconds"] = time.perf_counter() - t0
    out = ROOT / "benchmarks" / "results" / f"toy_heatmap_{init}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, allow_nan=True))
    plot(result, ROOT / "docs" / "img" / f"toy_heatmap_{init}.png")
    for t in STEPS:
        s = result["summary"][str(t)]
        print(
            f"t={t:>3}: best test loss {s['best_loss']:.4g} at η_A={s['best_eta_A']:.3g}, η_B={s['best_eta_B']:.3g} "
            f"(η_B/η_A = {s['best_ratio']:.3g}); best on the diagonal {s['best_diagonal_loss']:.4g} "
            f"at η={s['best_diagonal_eta']:.3g}; cells within {NEAR}× of the best have η_B/η_A from "
            f"{s['near_ratio_min']:.3g} to {s['near_ratio_max']:.3g}"
        )
    print(f"{len(SEEDS)} seeds × {len(GRID)}² grid in {result['setup']['seconds']:.1f}s")
    return result


if __name__ == "__main__":
    for name in sys.argv[1:] or ["paper"]:
        if name != "paper":
            raise SystemExit(f"unknown init {name!r}: only 'paper' (see train())")
        main(name)
    sys.exit(0)
