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
    from loraplus.layouts import CONVENTIONS

    page = (ROOT / "docs" / "roles.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| ") and "`…" in line]
    assert len(rows) == len(CONVENTIONS)
    for conv, row in zip(CONVENTIONS, rows):
        pattern = ".".join("<adapter>" if s == "*" else s for s in conv.pattern)
        assert f"`…{pattern}`" in row and f"`{conv.role.value}`" in row and conv.library in row, row


def _heading_at(readme: str, heading: str) -> int:
    at = readme.find(f"\n## {heading}\n")
    assert at >= 0, f"README.md has no '## {heading}' section"
    return at


def test_the_readme_says_how_to_install_and_use_before_what_was_measured():
    """A newcomer reads what it is, how to install it, a runnable example (PEFT, ``apply``, the
    Trainer) and which ratio and rate to use before the set-up commands, the measurements and the caveats."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    order = ["Install", "Use it on a PEFT model", "Already have an optimizer? `apply_to_optimizer`", "Hugging Face Trainer",
             "Which ratio and rate", "Set-up commands", "What we measured", "Caveats"]
    at = [_heading_at(readme, h) for h in order]
    assert at == sorted(at), f"README sections out of order: {sorted(zip(at, order))}"
    first_python = readme.find("```python")
    assert at[1] < first_python < at[2], "the first runnable example sits in the PEFT section"
    assert "get_peft_model" in readme[at[1]:at[2]] and "loraplus.apply_to_optimizer(" in readme[at[2]:at[3]]
    assert "LoraPlusTrainer(" in readme[at[3]:at[4]]
    assert "pip install" in readme[at[0]:at[1]]
    intro = readme[: at[0]]
    assert len([line for line in intro.splitlines() if line.strip()]) <= 1 + 3, "what it is: a title and three lines"
    assert not any(ch.isdigit() for ch in intro.replace("ICML 2024", "")), "no results before the install"
    caveats = readme[at[-1]:]
    assert "docs/compatibility.md" in caveats and "docs/guard.md" in caveats


def test_the_readme_caveats_name_what_the_records_say_breaks_the_ratio():
    """The caveats follow the scheduler catalogue and the learning-rate-free records: every scheduler
    argument that collapses the ratio when given as one number, and every optimizer family LoRA+ refuses,
    is named there, with the fix each record gives. A record added without a caveat fails here."""
    from loraplus._groups._lr_free import LR_FREE_OPTIMIZERS
    from loraplus.schedulers import SCHEDULERS, Fix

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    caveats = readme[_heading_at(readme, "Caveats"):]
    missing = []
    for rec in SCHEDULERS:
        for bound in rec.bounds:
            if bound.fix is Fix.PER_GROUP:
                said = f"{bound.argument}="
            elif bound.fix is Fix.LAMBDA_FLOOR:
                said = f"{bound.argument} > 0"
            else:
                said = f"{bound.argument}={bound.harmless:g}"
            if f"`{rec.name}" not in caveats or said not in caveats:
                missing.append(f"{rec.name}: {said}")
        if any(b.fix is Fix.PER_GROUP for b in rec.bounds) and "loraplus.scheduler_bounds(opt, value)" not in caveats:
            missing.append("the per_group fix")
        if any(b.fix is Fix.LAMBDA_FLOOR for b in rec.bounds) and "`LambdaLR`" not in caveats:
            missing.append("the LambdaLR floor")
    for opt in LR_FREE_OPTIMIZERS:
        family = "D-Adaptation" if opt.qualname.startswith("DAdapt") else f"`{opt.qualname}"
        if opt.per_group_lr.refused and (family not in caveats or opt.distribution not in caveats):
            missing.append(f"refused {opt.distribution} {opt.qualname}")
        if not opt.per_group_lr.refused and f"`{opt.qualname}" not in caveats:
            missing.append(f"warned {opt.qualname}")
    assert not missing, f"README caveats do not name: {missing}"
