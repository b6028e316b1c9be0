"""Every figure in README.md and docs/*.md is tied to one JSON key, and the check can fail.

Each page's table ``docs/_numbers/<page>.toml`` maps every quoted number to
``benchmarks/<where>/results/<file>.json#/json/pointer`` with the format it is printed in; the checker
(``tests/figures.py``) compares the printed number with the stored one at that rounding (sign,
digits, integers) and fails on any number in the prose or tables that has no entry and is not an
allowed non-figure. The mutation tests change every registered figure of a copy of the README
(and of a docs page) and require the checker to report each change.
"""

from __future__ import annotations

import json
from pathlib import Path

import figures
import pytest
import render_page
import tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("page", figures.PAGES)
def test_every_number_on_the_page_is_tied_to_its_json(page):
    problems = figures.check_page(page)
    assert not problems, f"{page}: " + "\n".join(problems[:40]) + (f"\n… {len(problems)} in all" if len(problems) > 40 else "")


def _mutations(printed: str) -> list[str]:
    """A changed last digit and a flipped (or added) sign."""
    i = max(k for k, ch in enumerate(printed) if ch in "0123456789")
    digit = str((int(printed[i]) + 1) % 10)
    out = [printed[:i] + digit + printed[i + 1 :]]
    if printed[0] in "+−-":
        out.append(("−" if printed[0] == "+" else "+") + printed[1:])
    else:
        out.append("−" + printed)
    return out


@pytest.mark.parametrize("page", ["README.md", "docs/head_to_head.md"])
def test_changing_any_registered_figure_is_reported(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    table = figures.load_table(page)
    assert not figures.check(text, table)
    missed = []
    for i, e in enumerate(table["figure"]):
        start, end, printed = figures.locate(text, e["quote"], e.get("nth"))
        # the README gets both changes; the long docs page one each, alternating (the run stays short)
        for changed in _mutations(printed) if page == "README.md" else [_mutations(printed)[i % 2]]:
            if not figures.check(text[:start] + changed + text[end:], table):
                missed.append((e["quote"], changed))
    assert not missed, f"changes the checker did not report: {missed[:10]}"


def test_an_unregistered_number_is_reported():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = figures.load_table("README.md")
    text = text.replace("## What we measured\n", "## What we measured\n\nIt is 12.5× faster.\n", 1)
    assert any("'12.5' has no entry" in p for p in figures.check(text, table))


def test_the_checker_reads_numbers_as_printed():
    assert [t.text for t in figures.tokens("loss 0.43 vs −0.106 [+0.05], 1,440 tensors, 3.0·10⁻³, `lr=2e-4`")] == [
        "0.43", "−0.106", "+0.05", "1,440", "3.0·10⁻³"]
    assert figures.parse("3.0·10⁻³") == pytest.approx(3e-3) and figures.parse("10⁻²") == pytest.approx(1e-2)
    assert figures.render(-0.0831, "+.3f") == "-0.083" and figures.render(9, "d") == "9"
    assert figures.same_printed("−0.083", "-0.083", ".3f") and not figures.same_printed("0.083", "-0.083", ".3f")


def test_the_demo_output_on_the_measured_page_is_the_committed_runs():
    """The demo's printed table on docs/measured.md shows what ``benchmarks/results/demo_mlp.json`` holds."""
    text = (ROOT / "docs" / "measured.md").read_text(encoding="utf-8")
    section = text.split("## The demo's output", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    demo = json.loads((ROOT / "benchmarks" / "results" / "demo_mlp.json").read_text())
    table = block.split("\n\n", 1)[0]  # the table, before the verdict lines
    rows = [line for line in table.splitlines() if line.startswith("LoRA")]
    assert [row.split("  ")[0] for row in rows] == [s["label"] for s in demo["summary"]]
    for row, s in zip(rows, demo["summary"]):
        assert f"{s['test_final_mean']:.4f}" in row and f"{s['lr_A']:g}" in row
    assert f"steps to {demo['target']:.4f}" in block
    assert f"total time {demo['seconds']:.1f} s" in block


def _text_block(page: str, after: str) -> str:
    text = (ROOT / page).read_text(encoding="utf-8")
    return text.split(after, 1)[1].split("```text", 1)[1].split("```", 1)[0]


def test_the_demo_output_on_the_docs_pages_is_the_measured_one():
    """The same printed demo table on docs/index.md and docs/benchmarks.md (checked above on docs/measured.md)."""
    readme = _text_block("docs/measured.md", "## The demo's output")
    def strip(b):
        return [line for line in b.splitlines() if not line.startswith(("plot written", "results written"))]

    assert strip(_text_block("docs/index.md", "python -m loraplus demo")) == strip(readme)
    assert strip(_text_block("docs/benchmarks.md", "## The demo")) == strip(readme)


def test_the_minilm_demo_output_on_the_benchmarks_page_is_its_json():
    block = _text_block("docs/benchmarks.md", "### The same comparison on a pretrained transformer")
    demo = json.loads((ROOT / "benchmarks" / "results" / "demo_minilm.json").read_text())
    rows = [line for line in block.splitlines() if line.startswith("LoRA")][: len(demo["summary"])]
    assert [row.split("  ")[0] for row in rows] == [s["label"] for s in demo["summary"]]
    for row, s in zip(rows, demo["summary"]):
        assert f"{s['test_final_mean']:.4f}" in row and f"{s['lr_A']:g}" in row and f"{s['lr_B']:g}" in row
    assert f"steps to {demo['target']:.4f}" in block
    assert f"total time {demo['seconds']:.1f} s" in block


def test_every_committed_result_names_the_command_that_produced_it():
    missing = []
    for path in figures.result_files():
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
        # a resumable file lists every command that added to it (``commands``)
        if isinstance(c, dict) and isinstance(c.get("versions"), dict) and "machine" in c and (
                "command" in c or c.get("commands")):
            found.append(c)
    return found


def test_every_committed_result_records_command_versions_and_machine():
    """New runs record them (``benchmarks/common/provenance.py``); older files carry a labelled retrofit."""
    bad = []
    for path in figures.result_files():
        data = json.loads(path.read_text())
        records = provenance_records(data)
        complete = [r for r in records if all(r["versions"].get(lib) for lib in LIBRARIES) and r["machine"]]
        if not complete and data.get("command") and data.get("files"):
            # a report merged from other result files: each of those must carry the record
            parts = [json.loads((path.parent / f).read_text()) for f in data["files"]]
            complete = [{} for d in parts if any(all(r["versions"].get(lib) for lib in LIBRARIES) and r["machine"]
                                                 for r in provenance_records(d))] if parts else []
            if len(complete) != len(parts):
                complete = []
        if not complete:
            bad.append(path.name)
        for r in complete:
            if "recorded" in r:  # a retrofit must say so
                assert r["recorded"].startswith("added afterwards"), (path.name, r["recorded"])
    assert not bad, f"results without command, versions of {LIBRARIES} and machine: {bad}"


def test_a_recorded_output_path_is_the_file_itself():
    """A command that names its output (``--out``, ``--json``) names the file it is stored in."""
    for path in figures.result_files():
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
    from benchmarks.common.provenance import command, provenance

    p = provenance(["--rounds", "3"], module="benchmarks.perf.monitor")
    assert p["command"] == "python -m benchmarks.perf.monitor --rounds 3"
    assert command(["-x"], script="tests/_soak_distributed.py") == "python tests/_soak_distributed.py -x"
    assert set(LIBRARIES) <= set(p["versions"]) and p["machine"]["cpus"]


# --------------------------------------------------------------------------- pages rendered from templates

TEMPLATED = sorted(p.stem for p in render_page.TEMPLATES.glob("*.md"))


@pytest.mark.parametrize("name", TEMPLATED)
def test_a_templated_page_and_its_table_are_what_the_template_renders(name):
    """docs/_src/<page>.md is the source: the committed page and its figure table must be its output."""
    assert render_page.main([name, "--check"]) == 0, f"run python tests/render_page.py {name}"


def test_the_templated_pages_include_the_ones_that_follow_the_studies():
    assert {"README", "convergence", "find_lr", "measured"} <= set(TEMPLATED)


def test_a_template_figure_is_rendered_from_its_json_and_tied_to_it():
    key = "studies/v2/results/summary.json#/tasks/order_B0/methods/loraplus4/diff/mean"
    value = figures.resolve(key)
    text, markers = render_page.render(f"λ=4 ends {{{{{key}|+.3f}}}} away, in test loss.\n")
    assert text == f"λ=4 ends {format(value, '+.3f').replace('-', '−')} away, in test loss.\n"
    table = tomllib.loads(render_page.table(text, markers, "docs/x.md"))
    table = {"figure": table["figure"], "allow": table.get("allow", [])}
    assert len(table["figure"]) == 1 and table["figure"][0]["source"] == key
    assert not figures.check(text, table)
    printed = markers[0].printed
    for changed in _mutations(printed):  # the generated quote still finds the number, and the change shows
        assert figures.check(text.replace(printed, changed), table)


def test_a_written_out_figure_must_match_its_source():
    key = "studies/v2/results/summary.json#/tasks/order_B0/methods/loraplus4/diff/mean"
    with pytest.raises(render_page.TemplateError, match="gives"):
        render_page.render(f"{{{{+0.500@{key}|+.3f}}}}")
    with pytest.raises(render_page.TemplateError, match="reason"):
        render_page.render("{{=4|}}")
    with pytest.raises(render_page.TemplateError, match="no_such_key"):
        render_page.render("{{studies/v2/results/summary.json#/no_such_key|d}}")


# --------------------------------------------------------------------------- results name their commit

#: Written before results recorded their commit: the one list of exceptions (issue #26).
RETROFITTED = ROOT / "benchmarks" / "RETROFITTED.toml"
#: What ``benchmarks/common/provenance.py`` records about the machine, and every new result must carry.
MACHINE_FIELDS = ("cpu_model", "cpus", "torch_threads", "device")


def names_its_code_and_machine(record: dict) -> bool:
    """A provenance record as ``provenance()`` writes it at run time: the commit (40 hex digits) and
    whether tracked files were dirty, every library's version, and the machine's CPU, threads and device."""
    commit = record.get("commit")
    machine = record.get("machine")
    return (isinstance(commit, str) and len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
            and isinstance(record.get("dirty"), bool)
            and isinstance(record.get("versions"), dict) and all(record["versions"].get(lib) for lib in LIBRARIES)
            and isinstance(machine, dict) and all(machine.get(k) not in (None, "") for k in MACHINE_FIELDS))


def _retrofitted() -> list[str]:
    return tomllib.loads(RETROFITTED.read_text(encoding="utf-8"))["files"]


def test_every_result_names_the_commit_and_machine_that_made_it_or_is_listed_as_older():
    listed = set(_retrofitted())
    results = {p.relative_to(RETROFITTED.parent).as_posix(): p for p in figures.result_files()}
    assert listed <= set(results), f"RETROFITTED.toml lists files that do not exist: {sorted(listed - set(results))}"
    unnamed, complete_but_listed = [], []
    for name, path in sorted(results.items()):
        complete = any(names_its_code_and_machine(r) for r in provenance_records(json.loads(path.read_text())))
        if name in listed and complete:
            complete_but_listed.append(name)
        elif name not in listed and not complete:
            unnamed.append(name)
    assert not unnamed, f"results without commit, dirty flag, versions and machine (benchmarks/common/provenance.py): {unnamed}"
    assert not complete_but_listed, f"re-measured, so take them off RETROFITTED.toml: {complete_but_listed}"


def test_the_provenance_check_refuses_what_it_must():
    from benchmarks.common.provenance import provenance

    record = provenance(["--json", "x.json"], module="benchmarks.perf.time_demo")
    assert names_its_code_and_machine(record)  # this checkout is a git repository
    for broken in ({"commit": None}, {"commit": "HEAD"}, {"dirty": None},
                   {"versions": {**record["versions"], "peft": None}},
                   {"machine": {**record["machine"], "cpu_model": None}},
                   {"machine": {k: v for k, v in record["machine"].items() if k != "device"}},
                   {"machine": "x86_64"}):
        assert not names_its_code_and_machine({**record, **broken}), broken


# --------------------------------------------------------------------------- labels, counts and ranges (issue #26)


def _page_and_table(page: str) -> tuple[str, dict]:
    text = (ROOT / page).read_text(encoding="utf-8")
    table = figures.load_table(page)
    assert not figures.check(text, table)
    return text, table


@pytest.mark.parametrize(("page", "sentence", "relabelled"), [
    ("docs/head_to_head.md", "LoRA+ λ = 4 ended lower than plain LoRA: −0.083", "LoRA+ λ = 16 ended lower than plain LoRA: −0.083"),
    ("README.md", "tuned rate (λ=4 +0.009", "tuned rate (λ=16 +0.009"),
    ("docs/measured.md", "| ratio 16: test loss 1.1160", "| ratio 4: test loss 1.1160"),
])
def test_a_method_label_changed_next_to_its_figure_is_reported(page, sentence, relabelled):
    """The figure is λ=4's (its JSON key names the method); a sentence now naming λ=16 is refused."""
    text, table = _page_and_table(page)
    assert text.count(sentence) == 1
    problems = figures.check(text.replace(sentence, relabelled), table)
    assert any("but the text names" in p for p in problems), problems


def test_a_result_after_a_library_name_is_still_a_figure():
    text, table = _page_and_table("README.md")
    for added, token in (("PEFT 12.5× slower.", "12.5"), ("PEFT 3 times slower.", "3")):
        changed = text.replace("## What we measured\n", f"## What we measured\n\n{added}\n", 1)
        assert any(f"{token!r} has no entry" in p for p in figures.check(changed, table)), added
    assert not figures.tokens("checked with PEFT 0.21.2 and torch 2.13, on Linux 6.18")


def test_a_count_is_tied_to_the_key_its_words_mean():
    """'lower on N' is a wins count, 'worse on N' a losses count, 'of M seeds' the number of seeds."""
    text, table = _page_and_table("README.md")
    sentence = "ended lower on 3 of 3 seeds"
    assert sentence in text
    # the words changed, and the table's quote with them (the old check then passed: it saw only the digits)
    edited = {**table, "figure": [{**e, "quote": e["quote"].replace("lower on «", "higher on «")} for e in table["figure"]]}
    problems = figures.check(text.replace(sentence, "ended higher on 3 of 3 seeds", 1), edited)
    assert problems and all("a losses count" in p for p in problems), problems
    page = "LoHa was worse on 3 of 3 seeds.\n"
    n = "studies/adapters/results/adapters_summary.json#/families/loha/4.0/diff/n"
    seeds = {"quote": "worse on 3 of «3» seeds", "source": n, "format": "d"}
    as_n = {"figure": [{"quote": "worse on «3» of 3", "source": n, "format": "d"}, seeds], "allow": []}
    assert any("a losses count" in p for p in figures.check(page, as_n))  # the audit's "worse on 3 of 3"
    losses = {"figure": [{"quote": "worse on «3» of 3", "source": n.replace("/n", "/per_seed"), "format": "d",
                          "transform": "higher"}, seeds], "allow": []}
    assert not figures.check(page, losses)
    wins_as_seeds = {"figure": [losses["figure"][0], {**seeds, "source": n.replace("/n", "/wins")}], "allow": []}
    assert any("the number of seeds compared" in p for p in figures.check(page, wins_as_seeds))


def test_every_value_in_a_quoted_range_is_checked():
    """'+0.2 % to +1.2 % at the four widths': each width's value lies in the range, not only its ends."""
    text, table = _page_and_table("docs/measured.md")
    high = "studies/find_lr/results/eval/width64.json#/summary/vs_best_lora/rel_diff_mean"
    (entry,) = [e for e in table["figure"] if e["source"] == high]
    start, end, printed = figures.locate(text, entry["quote"], entry.get("nth"))
    assert printed == "+1.2"
    assert figures.range_members("studies/find_lr/results/eval/width256.json#/x", "studies/find_lr/results/eval/width64.json#/x") == [
        f"studies/find_lr/results/eval/width{w}.json#/x" for w in (128, 256, 32, 64)]
    # the range's top end moved to width 128 (+1.1): width 64 (+1.2) now lies outside it
    other = high.replace("width64", "width128")
    moved = {"figure": [e if e is not entry else {**e, "source": other} for e in table["figure"]],
             "allow": table["allow"]}
    changed = text[:start] + "+1.1" + text[end:]
    problems = figures.check(changed, {**moved, "figure": [
        {**e, "quote": e["quote"].replace("+1.2", "+1.1")} for e in moved["figure"]]})
    assert any("width64.json" in p and "outside the range" in p for p in problems), problems


def _with_value(monkeypatch, source: str, value: float) -> None:
    """figures reads ``source`` as ``value`` (a copy of its JSON with one value moved)."""
    import copy

    name, _, pointer = source.partition("#")
    real = figures._load

    def load(n: str):
        data = real(n)
        if n != name:
            return data
        data = copy.deepcopy(data)
        *path, last = pointer.split("/")[1:]
        node = data
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
        return data

    monkeypatch.setattr(figures, "_load", load)


def test_a_member_inside_a_range_of_one_file_is_checked(monkeypatch):
    """'λ=2, 16, 32 trail by 0.03–0.04': the ends are λ=2's and λ=16's, λ=32's lies between; moved
    outside the printed range (its own JSON value changed), it is reported, not only a changed end."""
    text, table = _page_and_table("docs/convergence.md")
    (entry,) = [e for e in table["figure"] if e.get("over", "").startswith("studies/v1/results/minilm_summary.json#/main/best/[")]
    assert figures.expand(entry["over"]) == [f"studies/v1/results/minilm_summary.json#/main/best/{r}/diff/mean" for r in ("2.0", "16.0", "32.0")]
    middle = "studies/v1/results/minilm_summary.json#/main/best/32.0/diff/mean"
    assert 0.03 <= figures.resolve(middle) < 0.035  # by hand: +0.032 prints 0.03, inside 0.03–0.04
    _with_value(monkeypatch, middle, 0.061)
    problems = figures.check(text, table)
    assert any("32.0/diff/mean prints 0.06, outside the range" in p for p in problems), problems
    _with_value(monkeypatch, middle, 0.0324)  # moved, but printed the same everywhere: no problem
    assert not figures.check(text, table)


def test_a_range_over_a_set_must_print_the_sets_ends():
    """'2.3–2.8× a bare AdamW' over every size: re-tied and reprinted as 2.3–2.5× (each end still its
    own key's value), the sizes outside it are reported."""
    text, table = _page_and_table("docs/benchmarks.md")
    (entry,) = [e for e in table["figure"] if e.get("over") == "perf/results/construction.json#/sizes/*/loraplus_over_bare/median"]
    (high,) = [e for e in table["figure"] if e["source"] == "perf/results/construction.json#/sizes/0/loraplus_over_bare/median"
               and e["format"] == ".1f"]
    start, end, printed = figures.locate(text, high["quote"])
    assert printed == "2.8"  # size 0: 2.76 by the JSON, the largest of the four
    moved = {**high, "source": high["source"].replace("/sizes/0/", "/sizes/1/"),
             "quote": high["quote"].replace("«2.8»", "«2.5»")}
    changed = text[:start] + "2.5" + text[end:]
    edited = {**table, "figure": [moved if e is high else e for e in table["figure"]]}
    problems = figures.check(changed, edited)
    assert any("sizes/0/loraplus_over_bare/median prints 2.8, outside the range" in p for p in problems), problems
    # without the set named, the old check saw two ends in one file and passed
    bare = {**edited, "figure": [{k: v for k, v in e.items() if k != "over"} for e in edited["figure"]]}
    assert not figures.check(changed, bare)


def test_a_set_pattern_names_its_members():
    assert figures.expand("studies/v2/results/summary.json#/width/per_width/*/gain_vs_lora") == [
        f"studies/v2/results/summary.json#/width/per_width/{w}/gain_vs_lora" for w in ("32", "64", "128", "256")]
    # '*' keeps only the keys that have the rest of the path (LoRA-FA did not run on the A = 0 slice)
    assert figures.expand("studies/head_to_head/results/h2h/summary.json#/slices/*/lorafa/steps_to_target") == [
        f"studies/head_to_head/results/h2h/summary.json#/slices/{s}/lorafa/steps_to_target" for s in ("order_qv_B0", "source_qv_B0", "order_all_B0")]
    with pytest.raises(KeyError):  # a key named in [..] must exist
        figures.expand("studies/v1/results/minilm_summary.json#/a0/best/[4.0,5.0]/diff/mean")
    page = "A set of one: 0.43 here.\n"
    lone = {"figure": [{"quote": "one: «0.43» here", "source": "studies/v1/results/minilm_summary.json#/main/best/1.0/mean",
                        "format": ".2f", "over": "studies/v1/results/minilm_summary.json#/main/best/*/mean"}], "allow": []}
    assert any("not an end of a quoted range" in p for p in figures.check(page, lone))


def test_a_template_marker_names_the_set_of_its_range():
    key = "studies/v2/results/summary.json#/width/per_width/128/gain_vs_lora"
    over = "studies/v2/results/summary.json#/width/per_width/*/gain_vs_lora"
    text, markers = render_page.render(
        f"gained {{{{{key}|.1f|percent|over={over}}}}}–{{{{studies/v2/results/summary.json#/width/per_width/32/gain_vs_lora|.1f|percent}}}} %.\n")
    assert text == "gained 0.1–0.4 %.\n" and markers[0].over == over and markers[0].transform == "percent"
    tab = tomllib.loads(render_page.table(text, markers, "docs/x.md"))
    assert tab["figure"][0]["over"] == over and "over" not in tab["figure"][1]
    assert not figures.check(text, {"figure": tab["figure"], "allow": []})


def test_a_stored_min_and_max_are_checked_against_the_values_they_summarise(monkeypatch):
    """find_lr's '0.72–1.65×' prints the summary's min and max keys; its set is every (seed, ratio)
    point's edge, so a point moved outside them is reported although both ends still match."""
    text, table = _page_and_table("docs/find_lr.md")
    over = "studies/find_lr/results/eval/width32.json#/summary/landmarks_vs_swept/points/*/edge_over_best"
    assert sum(e.get("over") == over for e in table["figure"]) == 2  # the prose and the table row
    points = figures.resolve("studies/find_lr/results/eval/width32.json#/summary/landmarks_vs_swept/points")
    assert len(figures.expand(over)) == sum(p["edge_over_best"] is not None for p in points) == 8  # 4 ratios × 2 seeds
    # a probe that found no edge (null) is no member: 3 of order_B0's 15 points
    assert len(figures.expand(over.replace("width32", "order_B0"))) == 12
    _with_value(monkeypatch, "studies/find_lr/results/eval/width32.json#/summary/landmarks_vs_swept/points/0/edge_over_best", 1.9)
    problems = figures.check(text, table)
    assert sum("points/0/edge_over_best prints 1.9, outside the range" in p for p in problems) == 2, problems
