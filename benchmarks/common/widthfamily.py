"""Width family of study v2: small GPT-style byte-level LMs of one depth and several widths.

Everything is made here, from text that ships with Python, so nothing is downloaded:

* **Pretraining corpus**: the standard library's own source (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, without ``test``, ``idlelib``, ``lib2to3``, ``turtledemo``
  and ``pydoc_data``), as bytes.
* **Fine-tuning corpus** (the shifted distribution): the English reference-manual prose of
  ``pydoc_data.topics`` (79 topics). The topics are split *by document* into train, validation and
  test sets (seeded); held-out windows that still occur byte-for-byte in the training documents are
  dropped, and the count left (0) is measured and recorded.

``pretrain(width)`` trains one model (seeded) and caches it under ``~/.cache/loraplus/widthfamily/``
(``LORAPLUS_CACHE`` overrides), never in the repository; ``finetune(cfg)`` adds a PEFT LoRA adapter
(r = 8, α = 8, PEFT's init B = 0) to every attention and MLP linear and trains it with
``loraplus.LoraPlus(torch.optim.AdamW, model, ratio=λ, lr=lr)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import loraplus
from benchmarks.common.stats import schedule

DEPTH = 2
HEADS = 4
CTX = 64  # bytes of context
VOCAB = 256
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "site-packages", "__pycache__"}


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLUS_CACHE", Path.home() / ".cache" / "loraplus")) / "widthfamily"


# ------------------------------------------------------------------------------------------- corpora


@functools.cache
def pretrain_corpus() -> torch.Tensor:
    """The standard library's source files (sorted by path, concatenated) as a byte tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    for dirpath, dirs, files in os.walk(root):  # top-down, so pruning ``dirs`` skips those trees
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".py"):
                parts.append((Path(dirpath) / f).read_bytes())
    data = b"\n".join(parts)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@dataclass(frozen=True)
class Prose:
    """The fine-tuning corpus split by document, with the held-out windows fixed."""

    train: torch.Tensor  # bytes of the training documents, joined by a newline
    val: torch.Tensor  # (n, CTX + 1) windows
    test: torch.Tensor
    docs: dict[str, list[str]]
    dropped_overlap: int  # held-out windows dropped because they occur in the training text
    sha256: str


def _windows(text: bytes, n: int) -> list[bytes]:
    return [text[i : i + n] for i in range(0, len(text) - n + 1, n)]


@functools.cache
def prose(n_held_out: int = 256, seed: int = 0) -> Prose:
    """pydoc_data.topics split by topic: ~15 % of the bytes each for validation and test."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    total = sum(len(topics[k].encode()) for k in names)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    sets: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    size = {"test": 0, "val": 0}
    for i in perm:
        k = names[i]
        dest = next((s for s in ("test", "val") if size[s] < 0.15 * total), "train")
        sets[dest].append(k)
        if dest != "train":
            size[dest] += len(topics[k].encode())
    train = b"\n".join(topics[k].encode() for k in sorted(sets["train"]))
    held: dict[str, torch.Tensor] = {}
    dropped = 0
    g = torch.Generator().manual_seed(seed + 1)
    for s in ("val", "test"):
        ws = [w for k in sorted(sets[s]) for w in _windows(topics[k].encode(), CTX + 1)]
        keep = [w for w in ws if w not in train]
        dropped += len(ws) - len(keep)
        pick = torch.randperm(len(keep), generator=g)[:n_held_out].tolist()
        held[s] = torch.tensor([list(keep[i]) for i in sorted(pick)])
    sha = hashlib.sha256(train + b"".join(bytes(t.flatten().tolist()) for t in held.values())).hexdigest()
    return Prose(torch.frombuffer(bytearray(train), dtype=torch.uint8).long(), held["val"], held["test"],
                 {k: sorted(v) for k, v in sets.items()}, dropped, sha)


def overlap(p: Prose) -> int:
    """Held-out windows that occur byte-for-byte in the training text (measured, should be 0)."""
    train = bytes(p.train.tolist())
    return sum(bytes(w.tolist()) in train for w in torch.cat([p.val, p.test]))


def stream_batch(data: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``CTX + 1`` bytes from ``data``."""
    starts = torch.randint(0, len(data) - CTX - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + CTX + 1] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level causal LM: token + position embeddings, ``DEPTH`` pre-LN blocks, tied output."""

    def __init__(self, width: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(CTX, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(DEPTH))
        self.ln = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "fc2" not in name and "proj" not in name else 0.02 / math.sqrt(2 * DEPTH))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h) @ self.tok.weight.T


def lm_loss(model: nn.Module, w: torch.Tensor) -> torch.Tensor:
    logits = model(w[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------------------- pretraining

PRETRAIN = {"steps": 1200, "batch": 16, "lr": 2e-3, "seed": 0, "weight_decay": 0.1}


def pretrain_path(width: int, steps: int) -> Path:
    return cache_dir() / f"gpt_w{width}_d{DEPTH}_s{steps}.pt"


def pretrain(width: int, steps: int | None = None, log: Any = print, device: str = "cpu") -> dict[str, Any]:
    """Pretrain (seeded) or load from the cache; returns {'state': state_dict (on the CPU), 'meta': {...}}.

    ``device`` is where it trains (batches are drawn on the CPU, as on a CPU run, and moved there)."""
    steps = steps or PRETRAIN["steps"]
    path = pretrain_path(width, steps)
    if path.exists():
        return torch.load(path, weights_only=False)
    torch.manual_seed(PRETRAIN["seed"])
    model = GPT(width).to(device)
    data = pretrain_corpus()
    n_val = 200_000
    train, val = data[:-n_val], data[-n_val:]
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": PRETRAIN["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=PRETRAIN["lr"], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    t0 = time.perf_counter()
    losses = []
    for s in range(steps):
        loss = lm_loss(model, stream_batch(train, PRETRAIN["batch"], gen).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if s % 200 == 0 or s == steps - 1:
            log(f"pretrain w={width} step {s} loss {statistics_mean(losses[-50:]):.3f} {time.perf_counter() - t0:.0f}s")
    model.eval()
    with torch.no_grad():
        vg = torch.Generator().manual_seed(7)
        val_loss = sum(float(lm_loss(model, stream_batch(val, 64, vg).to(device))) for _ in range(4)) / 4
        p = prose()
        prose_loss = float(lm_loss(model, p.test.to(device)))
    meta = dict(PRETRAIN, width=width, depth=DEPTH, heads=HEADS, ctx=CTX, steps=steps,
                seconds=time.perf_counter() - t0, final_train_loss=statistics_mean(losses[-50:]),
                code_val_loss=val_loss, prose_test_loss_before_finetune=prose_loss,
                device=str(device), corpus_bytes=len(data), corpus_sha256=hashlib.sha256(bytes(data[:1_000_000].tolist())).hexdigest(),
                params=sum(p.numel() for p in model.parameters()))
    out = {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return out


def statistics_mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


# ----------------------------------------------------------------------------------------- fine-tuning

TARGETS = ["qkv", "proj", "fc1", "fc2"]


@dataclass
class FinetuneConfig:
    width: int = 64
    ratio: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    steps: int = 300
    batch: int = 16
    rank: int = 8
    pretrain_steps: int = PRETRAIN["steps"]
    n_eval: int = 256
    device: str = "cpu"  # where the adapter trains (the batches and their order do not depend on it)


@functools.lru_cache(maxsize=4)
def _base(width: int, pretrain_steps: int, device: str = "cpu") -> dict[str, Any]:
    return pretrain(width, pretrain_steps, device=device)


def adapted(width: int, seed: int, rank: int = 8, pretrain_steps: int = PRETRAIN["steps"],
            device: str = "cpu") -> nn.Module:
    import peft

    model = GPT(width)
    model.load_state_dict(_base(width, pretrain_steps, device)["state"])
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS)
    return peft.inject_adapter_in_model(cfg, model).to(device)  # initialised on the CPU, as on a CPU run


def _eval(model: nn.Module, w: torch.Tensor) -> float:
    with torch.no_grad():
        dev = next(model.parameters()).device
        return sum(float(lm_loss(model, w[i : i + 64].to(dev))) * len(w[i : i + 64]) for i in range(0, len(w), 64)) / len(w)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """One LoRA fine-tuning run on the prose; returns the config, the curve and the held-out losses."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = adapted(cfg.width, cfg.seed, cfg.rank, cfg.pretrain_steps, cfg.device)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=cfg.ratio, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg.steps))
    p = prose()
    gen = torch.Generator().manual_seed(cfg.seed)
    curve: list[float] = []
    model.train()
    for _ in range(cfg.steps):
        loss = lm_loss(model, stream_batch(p.train, cfg.batch, gen).to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        v = float(loss.detach())
        curve.append(v if math.isfinite(v) else float("inf"))
        if not math.isfinite(v):
            break
    model.eval()
    diverged = len(curve) < cfg.steps or not math.isfinite(curve[-1])
    val = _eval(model, p.val[: cfg.n_eval])
    test = _eval(model, p.test[: cfg.n_eval])
    if diverged or not math.isfinite(val) or not math.isfinite(test):
        diverged, val, test = True, float("inf"), float("inf")
    return {"config": asdict(cfg), "lr": cfg.lr, "seed": cfg.seed, "curve": curve, "val_loss": val, "test_loss": test,
            "diverged": diverged, "seconds": time.perf_counter() - t0}
