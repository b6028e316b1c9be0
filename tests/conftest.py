"""Shared test configuration."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401 (hooks)
from hypothesis import HealthCheck, settings  # noqa: E402

pytest_plugins = ["pytester"]

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

if os.environ.get("CI"):
    # installing an extra must never replace the CPU build of torch pinned by .ci/run
    assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
