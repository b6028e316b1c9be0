"""benchmarks/ laid out by purpose (issue #27): no import circle in loraplus/ or benchmarks/, every command a
committed result records still runs (as it is, or through benchmarks/MOVED.toml with the same arguments),
every path into benchmarks/ that the docs name exists, and no test edits ``sys.path``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import figures
import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
MOVED = ROOT / "benchmarks" / "MOVED.toml"
PACKAGES = ("loraplus", "benchmarks")

# --------------------------------------------------------------------------------------------- import graph


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> Iterator[str]:
    """The modules of ``modules`` that the import statements anywhere in ``tree`` (top level or inside a
    function) import, relative imports resolved against ``module``. ``from X import Y`` imports the module
    ``X.Y`` where there is one, else ``X`` (a name defined in X); the package ``X`` of a submodule is not
    counted (its ``__init__`` runs for any import of a submodule, as Python orders it)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    yield f"{target}.{alias.name}"
                elif target in modules:
                    yield target


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """``{module: modules of the tree it imports}`` for every ``.py`` file under ``root/<package>/``."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = set(_imported(tree, name, path.name == "__init__.py", set(files))) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle_and_only_a_circle(tmp_path):
    """Ground truth written here: a two-module circle through a relative import, a lazy import inside a
    function, and an acyclic chain beside them."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("import pkg.a\nfrom pkg.sub import b\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a", "pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("X = 1\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


def test_no_import_circle_in_loraplus_or_benchmarks():
    graph = import_graph(ROOT)
    assert "benchmarks.studies.v2.run" in graph and "loraplus" in graph  # the walk saw both trees
    assert "benchmarks.common.report" in graph["benchmarks.studies.v2.run"]
    assert not cycles(graph), f"import circles: {cycles(graph)}"


# ------------------------------------------------------------------------------------- recorded commands


def _commands(data: Any) -> Iterator[str]:
    """Every command a result JSON records: the values of its ``command`` keys and ``commands`` lists or maps."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "command" and isinstance(value, str):
                yield value
            elif key == "commands" and isinstance(value, (list, dict)):
                yield from (v for v in (value.values() if isinstance(value, dict) else value) if isinstance(v, str))
            else:
                yield from _commands(value)
    elif isinstance(data, list):
        for value in data:
            yield from _commands(value)


def _recorded() -> dict[str, list[str]]:
    """``{command: [result files recording it]}`` over every committed result JSON."""
    out: dict[str, list[str]] = {}
    for path in figures.result_files():
        for command in _commands(json.loads(path.read_text(encoding="utf-8"))):
            if command.startswith("python "):
                out.setdefault(command, []).append(path.relative_to(ROOT).as_posix())
    return out


def _moved() -> dict[str, str]:
    return tomllib.loads(MOVED.read_text(encoding="utf-8"))["scripts"]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def resolve(command: str, moved: dict[str, str]) -> tuple[str, list[str]] | str:
    """``(module, arguments)`` a recorded command runs now, or why it runs nothing."""
    words = shlex.split(command)
    if words[1] == "-m":
        module, args = words[2], words[3:]
        return (module, args) if _is_module(module) else f"no module {module}"
    script, args = words[1], words[2:]
    if script in moved:
        module = moved[script]
        return (module, args) if _is_module(module) else f"{script} is mapped to {module}, which does not exist"
    return ("", args) if (ROOT / script).is_file() else f"{script} neither exists nor is in benchmarks/MOVED.toml"


def refused(module: str, args: list[str]) -> str | None:
    """Why ``module``'s argument parser refuses ``args`` (None: it accepts them); nothing runs."""
    parser = getattr(importlib.import_module(module), "parser", None)
    if parser is None:
        return f"{module} has no parser()"
    try:
        parser().parse_args(args)
    except SystemExit as exc:
        return f"{module} refuses {args} (exit {exc.code})"
    return None


def test_every_recorded_command_runs_now_or_is_mapped_to_a_module_that_takes_its_arguments(capsys):
    recorded, moved = _recorded(), _moved()
    assert len(recorded) > 20 and any("benchmarks/study_v2.py" in c for c in recorded)  # the old commands are kept
    broken = []
    for command, files in sorted(recorded.items()):
        target = resolve(command, moved)
        if isinstance(target, str):
            broken.append((command, target, files[0]))
        elif command.split()[1] in moved and (why := refused(*target)):
            broken.append((command, why, files[0]))
    capsys.readouterr()  # argparse's messages for refused arguments
    assert not broken, broken


def test_every_mapped_module_exists_and_has_a_parser():
    moved = _moved()
    for script, module in moved.items():
        assert not (ROOT / script).exists(), f"{script} is mapped but still exists"
        assert _is_module(module), module
    runnable = {m for s, m in moved.items() if not s.endswith("_minilm.py")}  # _minilm's timing stub takes raw argv
    assert all(callable(getattr(importlib.import_module(m), "parser", None)) for m in runnable)


@pytest.mark.parametrize(("command", "why"), [
    ("python benchmarks/no_such_script.py run", "neither exists"),
    ("python -m benchmarks.studies.no_such_study.run", "no module"),
])
def test_a_command_that_runs_nothing_is_reported(command, why):
    assert why in resolve(command, _moved())


@pytest.mark.parametrize("args", [["run", "no_such_task", "lora"], ["pretrain", "wide"], ["--no-such-flag"]])
def test_arguments_the_mapped_module_does_not_take_are_reported(args, capsys):
    module, _ = resolve("python benchmarks/study_v2.py run order_B0 lora", _moved())
    assert module == "benchmarks.studies.v2.run" and refused(module, ["run", "order_B0", "lora"]) is None
    assert refused(module, args)


# ------------------------------------------------------------------------------------------ docs and links

DOC_PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))),
             *(f"docs/_src/{p.name}" for p in sorted((ROOT / "docs" / "_src").glob("*.md")))]
#: a path into benchmarks/ as the pages write it (in code spans, links or prose)
BENCH_PATH = re.compile(r"(?<![\w/.-])benchmarks/[\w./<>*{},-]*")
#: folders a documented command creates when it runs, not committed: the GPU kit's output (docs/gpu.md)
WRITTEN_WHEN_RUN = ("benchmarks/results/gpu",)
MODULE_COMMAND = re.compile(r"python -m (benchmarks(?:\.\w+)+)")


def _exists(ref: str) -> bool:
    """A path, or a pattern (``<task>``, ``*``, ``{a,b}``) with at least one match."""
    ref = ref.rstrip(".,;:")
    if ref.rstrip("/") in WRITTEN_WHEN_RUN:
        return True
    if not re.search(r"[<>*{}]", ref):
        return (ROOT / ref).exists()
    pattern = re.sub(r"<[^>]*>", "*", ref)
    pattern = re.sub(r"\{([^}]*)\}", "*", pattern)
    return any(ROOT.glob(pattern))


def test_every_path_into_benchmarks_on_the_pages_exists():
    missing = [(page, ref) for page in DOC_PAGES for ref in BENCH_PATH.findall((ROOT / page).read_text(encoding="utf-8"))
               if not _exists(ref)]
    assert not missing, missing


def test_the_pages_show_module_commands_that_exist_and_no_old_script_paths():
    old = [(page, s) for page in DOC_PAGES for s in _moved() if f"python {s}" in (ROOT / page).read_text(encoding="utf-8")]
    assert not old, f"pages still show the old commands: {old}"
    shown = {m for page in DOC_PAGES for m in MODULE_COMMAND.findall((ROOT / page).read_text(encoding="utf-8"))}
    assert "benchmarks.studies.v2.run" in shown
    assert not [m for m in shown if not _is_module(m)]


def test_every_relative_link_of_the_benchmarks_readmes_resolves():
    readmes = sorted((ROOT / "benchmarks").rglob("README.md"))
    assert len(readmes) >= 9  # benchmarks/, each study, study v2's results
    broken = [(p.relative_to(ROOT).as_posix(), link) for p in readmes
              for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", p.read_text(encoding="utf-8"))
              if not (p.parent / link).exists()]
    assert not broken, broken


def test_every_study_has_a_runner_results_and_a_readme_linking_its_docs_page():
    studies = sorted(p for p in (ROOT / "benchmarks" / "studies").iterdir() if (p / "__init__.py").exists())
    assert {p.name for p in studies} >= {"v1", "v2", "adapters", "head_to_head", "toy_heatmap", "monitor_width", "find_lr"}
    for study in studies:
        readme = (study / "README.md").read_text(encoding="utf-8")
        assert (study / "results").is_dir() and any((study / "results").rglob("*.json")), study.name
        assert re.search(r"\]\((\.\./)+docs/\w+\.md\)", readme), study.name
        assert "python -m benchmarks.studies." + study.name in readme, study.name


def test_no_test_edits_sys_path():
    edits = [p.name for p in sorted(Path(__file__).parent.glob("*.py"))
             if re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*=", p.read_text(encoding="utf-8"))
             and p.name != Path(__file__).name]
    assert not edits, edits


def test_study_v2_runs_write_into_its_results_folder_and_its_report_reads_from_there(monkeypatch):
    """New cells (the width family's ``width512__*.json`` included) land in benchmarks/studies/v2/results/,
    the folder ``report`` reads; the committed cells are there. Nothing runs: the calls are recorded."""
    from benchmarks.common import report as R
    from benchmarks.studies.v2 import run as V

    folder = ROOT / "benchmarks" / "studies" / "v2" / "results"
    assert V.OUT == folder and (folder / "width32__lora.json").is_file() and (folder / "summary.json").is_file()
    calls: list[tuple[str, Path]] = []
    monkeypatch.setattr(V, "run_cell", lambda task, method, out, *a, **k: calls.append(("run_cell", out)))
    monkeypatch.setattr(V, "run_task", lambda task, out, *a, **k: calls.append(("run_task", out)))
    monkeypatch.setattr(R, "report", lambda out, design, **k: calls.append(("report", out)))
    V.main(["run", "width512", "lora"])
    V.main(["run", "width512", "all"])
    V.main(["report"])
    assert calls == [("run_cell", folder), ("run_task", folder), ("report", folder)]
    assert "width512" in V.WIDTH_TASKS and R.load_all(folder)["width32"]  # report's reader finds the cells there


# ------------------------------------------------------------------------------------- the shared report

#: what a summary records about the run that wrote it (the commit, the machine) and the protocol's prose
_RUN_RECORD = {"command", "commit", "dirty", "versions", "machine", "provenance", "method"}


def _as_json(x: Any) -> Any:
    data = json.loads(json.dumps(x))
    return {k: v for k, v in data.items() if k not in _RUN_RECORD}


@pytest.mark.timeout(300)
def test_the_shared_report_reproduces_the_committed_summaries(tmp_path, monkeypatch):
    """Ground truth: the summaries the separate study-1 and study-v2 report modules wrote and committed.
    Re-rendered from the committed results by benchmarks.common.report, every figure is the same (study v2:
    every task and the width family of the committed summary; cells added since it was written aside)."""
    pytest.importorskip("matplotlib")
    import shutil

    from benchmarks.common import report as R
    from benchmarks.studies.v2 import run as V

    studies = ROOT / "benchmarks" / "studies"
    for study in ("v1", "adapters", "v2"):
        shutil.copytree(studies / study / "results", tmp_path / study)
    monkeypatch.setattr(R, "DOCS_IMG", tmp_path / "img")
    new = {"v1/minilm_summary.json": R.minilm_report(tmp_path / "v1"),
           "adapters/adapters_summary.json": R.adapters_report(tmp_path / "adapters")}
    for name, summary in new.items():
        study, file = name.split("/")
        old = json.loads((studies / study / "results" / file).read_text(encoding="utf-8"))
        assert _as_json(summary) == _as_json(old), name
    v2 = _as_json(R.report(tmp_path / "v2", V.DESIGN, img_dir=tmp_path / "img", write_plan=False))
    old = json.loads((studies / "v2" / "results" / "summary.json").read_text(encoding="utf-8"))
    assert {t: v2["tasks"][t] for t in old["tasks"]} == old["tasks"] and v2["width"] == old["width"]
