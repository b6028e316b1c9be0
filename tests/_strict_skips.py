"""Under ``CI=true`` a skipped test is a failure, unless it carries the ``cuda`` marker.

Every dependency the tests use is installed by ``.ci/run`` (the ``test`` extra), so a skip there
means something is missing or broken (``pytest.importorskip`` of a package that failed to install,
a ``skip`` left in by mistake), and it must not pass silently. The one thing CI cannot have is a
CUDA device, and a test that needs one says so with ``@pytest.mark.cuda`` (:data:`HARDWARE_MARKER`,
registered in pyproject.toml); only such a test may skip under CI. The skip's reason text is never
read: an ``importorskip`` whose import error happens to mention CUDA still fails. A whole module
skipped at import time (``importorskip`` at module level) has no markers to show and always fails
under CI. Locally, without ``CI``, skips are skips.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["HARDWARE_MARKER", "pytest_make_collect_report", "pytest_runtest_makereport"]

#: The marker of tests that need hardware CI does not have (a CUDA device): they may skip under CI.
HARDWARE_MARKER = "cuda"


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


def _fail_if_strict(node: pytest.Item | pytest.Collector, report: Any) -> None:
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    if node.get_closest_marker(HARDWARE_MARKER) is not None:
        return
    why = _reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true ({why}): every test dependency is installed by .ci/run, so this skip hides a "
        f"missing or broken one; install it, or, if the test needs a CUDA device, mark it @pytest.mark.{HARDWARE_MARKER}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _fail_if_strict(item, outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    _fail_if_strict(collector, outcome.get_result())
