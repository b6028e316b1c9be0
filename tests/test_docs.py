"""Every ```python example in README.md and docs/*.md runs (blocks of one file share a namespace)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(_blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.name}, block {i} failed: {type(err).__name__}: {err}\n{code}") from err


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = [line for line in ci.splitlines() if "python -m pytest" in line]
    assert len(command) == 1, "CI must run exactly one test command"
    assert command[0].strip() in readme, "the README must print the exact command .ci/run runs"
    assert "torch==2.13.0" in command[0]
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_roles_page_lists_every_convention():
    from loraplus import CONVENTIONS

    page = (ROOT / "docs" / "roles.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| ") and "`…" in line]
    assert len(rows) == len(CONVENTIONS)
    for conv, row in zip(CONVENTIONS, rows):
        pattern = ".".join("<adapter>" if s == "*" else s for s in conv.pattern)
        assert f"`…{pattern}`" in row and f"`{conv.role.value}`" in row and conv.library in row, row
