"""Every number in README.md's "What we measured" table comes from a committed JSON result.

The README cannot drift from the data again: each decimal number in the table's result column
must equal, at the precision printed, some number stored in ``benchmarks/results/*.json`` (the
demo's row: ``benchmarks/results/demo_mlp.json``, written by the command the Benchmarks page
gives). A ratio printed as ``1.9×`` must be stored as a ratio, not derived in the prose.

Only summary values count: raw per-run data (curves, grids of every seed, per-step timings)
hold so many numbers that a short decimal would match one of them by chance.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*(?:\.\d+)?")


def results_table() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What we measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert rows and rows[0].startswith("| question"), "the results table moved: update this test"
    return [[cell.strip() for cell in row.strip("|").split("|")][1] for row in rows[1:]]


#: Keys whose values are raw data, not summaries.
RAW = {"runs", "test", "train", "mean_test", "median_test", "best_cell_curve", "best_diagonal_curve", "seconds",
       "step_seconds", "curve", "seed_curves", "grid"}
#: Lists longer than this are raw data too (curves, per-repetition timings).
MAX_LIST = 12


def stored_numbers() -> list[float]:
    out: list[float] = []

    def walk(v: object) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                out.append(float(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                if k not in RAW:
                    walk(x)
        elif isinstance(v, (list, tuple)) and len(v) <= MAX_LIST:
            for x in v:
                walk(x)

    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        walk(json.loads(path.read_text()))
    return out


def printed_numbers(cell: str) -> list[str]:
    cell = re.sub(r"`[^`]*`", "", cell)  # code (ratio=4, every=10) is a setting, not a result
    cell = re.sub(r"\[[^\]]*\]\([^)]*\)", "", cell)  # links
    cell = re.sub(r"(λ|η_?[AB]?|r|t|seeds?)\s*=\s*[\d.]+", "", cell)  # settings written as name=value
    return [m.group(0) for m in NUMBER.finditer(cell) if "." in m.group(0)]


def matches(token: str, stored: list[float]) -> bool:
    value = float(token.replace(",", "").replace("−", "-"))
    decimals = len(token.split(".")[1])
    tol = 0.5 * 10**-decimals + 1e-12
    return any(abs(abs(v) - abs(value)) <= tol for v in stored)


def test_readme_results_table_has_rows():
    assert len(results_table()) >= 5


def test_every_decimal_in_the_results_table_is_in_a_committed_json():
    stored = stored_numbers()
    missing = [(cell[:60], tok) for cell in results_table() for tok in printed_numbers(cell) if not matches(tok, stored)]
    assert not missing, f"README numbers with no committed JSON behind them: {missing}"


def test_the_checker_rejects_an_invented_number():
    assert not matches("123.4567", stored_numbers())
    assert printed_numbers("ratio 4: **1.094** vs `lr=2e-4` (λ=4) 0.5 [link 9.9](x.md)") == ["1.094", "0.5"]


def test_the_demo_output_in_the_readme_is_the_committed_runs():
    """The demo's printed table in README.md shows what ``benchmarks/results/demo_mlp.json`` holds."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What we measured", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    demo = json.loads((ROOT / "benchmarks" / "results" / "demo_mlp.json").read_text())
    table = block.split("\n\n", 1)[0]  # the table, before the verdict lines
    rows = [line for line in table.splitlines() if line.startswith("LoRA")]
    assert [row.split("  ")[0] for row in rows] == [s["label"] for s in demo["summary"]]
    for row, s in zip(rows, demo["summary"]):
        assert f"{s['test_final_mean']:.4f}" in row and f"{s['lr_A']:g}" in row
    assert f"steps to {demo['target']:.4f}" in block
    assert f"total time {demo['seconds']:.1f} s" in block


def test_every_committed_result_names_the_command_that_produced_it():
    missing = []
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        command = data.get("command") or meta.get("command") or data.get("setup", {}).get("command")
        commands = meta.get("commands") or data.get("commands")
        if not command and commands:  # a resumable file lists every command that added to it
            command = commands[0] if isinstance(commands, list) else next(iter(commands.values()))
        parts = [v for k, v in data.items() if isinstance(v, dict) and k != "provenance"]
        if not command and parts and all(isinstance(v.get("command"), str) for v in parts):
            command = parts[0]["command"]  # a file of parts (the width sweep and its real run), each with its command
        if not command:
            missing.append(path.name)
        else:
            assert command.startswith("python "), (path.name, command)
    assert not missing, f"results without a command field: {missing}"


#: The libraries whose versions every result records.
LIBRARIES = ("torch", "peft", "transformers", "pytorch-optimizer", "lora-pro-adamw")


def provenance_records(data: dict) -> list[dict]:
    """Every ``{"command", "versions", "machine"}`` record in a result file (top level, ``provenance``, parts)."""
    found = []
    candidates = [data, data.get("provenance"), (data.get("meta") or {}).get("provenance")]
    candidates += [v for v in data.values() if isinstance(v, dict)]
    candidates += list((data.get("provenance") or {}).values()) if isinstance(data.get("provenance"), dict) else []
    for c in candidates:
        if isinstance(c, dict) and isinstance(c.get("versions"), dict) and "machine" in c and "command" in c:
            found.append(c)
    return found


def test_every_committed_result_records_command_versions_and_machine():
    """New runs record them (``benchmarks/_provenance.py``); older files carry a labelled retrofit."""
    bad = []
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        records = provenance_records(json.loads(path.read_text()))
        complete = [r for r in records if all(r["versions"].get(lib) for lib in LIBRARIES) and r["machine"]]
        if not complete:
            bad.append(path.name)
        for r in complete:
            if "recorded" in r:  # a retrofit must say so
                assert r["recorded"].startswith("added afterwards"), (path.name, r["recorded"])
    assert not bad, f"results without command, versions of {LIBRARIES} and machine: {bad}"


def test_a_recorded_output_path_is_the_file_itself():
    """A command that names its output (``--out``, ``--json``) names the file it is stored in."""
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        data = json.loads(path.read_text())
        for r in provenance_records(data) + [data]:
            cmd = r.get("command")
            if not isinstance(cmd, str):
                continue
            words = cmd.split()
            flag = "--json" if "--json" in words else "--out"  # the demo's --out is its figure
            if flag in words:
                assert Path(words[words.index(flag) + 1]).name == path.name, (path.name, cmd)


def test_new_runs_record_provenance():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _provenance import provenance

    p = provenance(["--rounds", "3"], script="benchmarks/bench_monitor.py")
    assert p["command"] == "python benchmarks/bench_monitor.py --rounds 3"
    assert set(LIBRARIES) <= set(p["versions"]) and p["machine"]["cpus"]
