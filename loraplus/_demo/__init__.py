"""The main job, ``python -m loraplus demo``: plain LoRA vs LoRA+, each at its own best learning rate.

Not imported by ``import loraplus``; ``loraplus.__main__`` loads it when the demo runs.
"""

from ._config import MINILM_HEAD_LR, MINILM_PRESETS, MLP_PRESETS, DemoConfig
from ._minilm import _MiniLMTask, minilm_path  # noqa: F401  (_MiniLMTask: for the tests)
from ._mlp import _MlpTask  # noqa: F401  (for the tests)
from ._report import DemoResult, MethodResult, Paired, format_table, paired, plot, report, verdict
from ._run import run_demo
from ._train import LoraLinear, _progress, _TextBar  # noqa: F401  (the private names: for the tests)

__all__ = [
    "MINILM_HEAD_LR",
    "MINILM_PRESETS",
    "MLP_PRESETS",
    "DemoConfig",
    "DemoResult",
    "LoraLinear",
    "MethodResult",
    "Paired",
    "format_table",
    "minilm_path",
    "paired",
    "plot",
    "report",
    "run_demo",
    "verdict",
]
