"""The documentation site builds with ``mkdocs build --strict`` and its API pages come from the docstrings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M)


def test_every_nav_page_exists():
    pages = _nav_pages()
    assert {"index.md", "quickstart.md", "api.md", "benchmarks.md"} <= set(pages)
    missing = [p for p in pages if not (ROOT / "docs" / p).exists()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # generated from the docstrings: every public name has an anchor, and the examples are code
    import loraplus

    for name in ("LoraPlus", "param_groups", "classify", "explain", "Role", "LoraPlusError"):
        assert name in loraplus.__all__
        assert f'id="loraplus.{name}"' in api, name
    assert "B/A learning-rate ratio" in api  # text of LoraPlus' docstring
    assert "&gt;&gt;&gt;" in api and "highlight" in api  # doctest examples rendered as code
    assert (site / "benchmarks" / "index.html").exists()
    assert (site / "img" / "demo.png").exists()
