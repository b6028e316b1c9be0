"""Render a docs page from its template: every figure read from its JSON, the page's figure table
written alongside (the same tables ``tests/figures.py`` checks).

A template (``docs/_src/<page>.md``) is the page with each quoted number written as a marker:

``{{<where>/results/file.json#/json/pointer|format}}`` (the file named relative to benchmarks/) or ``{{<where>/results/file.json#/pointer|format|transform}}``
    a figure: the stored value, formatted (``tests/figures.py``'s formats and transforms;
    negative numbers print with a true minus sign, ``−``);
``{{<where>/results/file.json#/pointer|format|over=set}}`` (also after a transform)
    one end of a range that summarises a set (``tests/figures.py``'s ``over``: a pattern with ``*``
    or ``[a,b]`` segments, :func:`figures.expand`): the printed ends must be the set's smallest and
    largest member;
``{{printed@<where>/results/file.json#/pointer|format}}``
    a figure printed as written, checked against its source at its precision (for ``sci``);
``{{=printed|why}}``
    a number that is not a result (a setting, a size), with the reason.

``python tests/render_page.py convergence`` writes ``docs/convergence.md`` and
``docs/_numbers/convergence.toml``: each entry's quote is the shortest text around the number
that occurs once on the page. ``--check`` writes nothing and fails when either file differs from
what the template renders (tests/test_readme_numbers.py runs it); ``--from-page`` turns a page
and its existing table back into a template (used once per page).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import figures

ROOT = figures.ROOT
TEMPLATES = ROOT / "docs" / "_src"
MARKER = re.compile(r"\{\{(?P<body>[^{}]+)\}\}")
#: how far a quote may reach on each side before an occurrence number (``nth``) is used instead
_REACH = 90


class TemplateError(ValueError):
    """A marker that cannot be rendered, or a rendered figure that does not match its source."""


@dataclass(frozen=True)
class Marker:
    start: int  # in the rendered page
    end: int
    printed: str
    source: str | None  # None for an allowed number
    fmt: str | None
    transform: str | None
    why: str | None
    over: str | None = None  # the set a range's end summarises (figures.expand)


def _minus(text: str) -> str:
    return "−" + text[1:] if text.startswith("-") else text


def _parse(body: str) -> tuple[str | None, str | None, str | None, str | None, str | None, str | None]:
    """(printed or None, source, format, transform, why, over) of one marker's body."""
    if body.startswith("="):
        printed, sep, why = body[1:].partition("|")
        if not sep or not why.strip():
            raise TemplateError(f"an allowed number needs a reason: {{{{{body}}}}}")
        return printed, None, None, None, why.strip(), None
    printed = None
    if "@" in body:
        printed, _, body = body.partition("@")
    parts = body.split("|")
    over = parts.pop()[len("over="):] if len(parts) > 2 and parts[-1].startswith("over=") else None
    if len(parts) not in (2, 3) or over == "":
        raise TemplateError(f"a figure is {{{{source|format}}}} or {{{{source|format|transform}}}}, "
                            f"optionally then |over=set: {{{{{body}}}}}")
    source, fmt = parts[0], parts[1]
    transform = parts[2] if len(parts) == 3 else None
    return printed, source, fmt, transform, None, over


def render(template: str) -> tuple[str, list[Marker]]:
    """The page, and where each of its marked numbers is on it."""
    out: list[str] = []
    markers: list[Marker] = []
    pos = length = 0
    for m in MARKER.finditer(template):
        out.append(template[pos : m.start()])
        length += m.start() - pos
        printed, source, fmt, transform, why, over = _parse(m["body"])
        if source is not None:
            assert fmt is not None
            try:
                expected = figures.render(figures.resolve(source), fmt, transform)
            except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as err:
                raise TemplateError(f"{source}: {type(err).__name__}: {err}") from err
            if printed is None:
                if fmt.startswith("sci"):
                    raise TemplateError(f"a sci figure is written out: {{{{3.0·10⁻³@{source}|{fmt}}}}}")
                printed = _minus(expected)
            elif not figures.same_printed(printed, expected, fmt):
                raise TemplateError(f"{printed} is written for {source}, which gives {expected}")
        assert printed is not None
        if not figures.NUMBER.fullmatch(printed):
            raise TemplateError(f"not a number as the pages print them: {printed!r}")
        markers.append(Marker(length, length + len(printed), printed, source, fmt, transform, why, over))
        out.append(printed)
        length += len(printed)
        pos = m.end()
    out.append(template[pos:])
    return "".join(out), markers


def _quote(text: str, mk: Marker) -> tuple[str, int | None]:
    """The shortest text around the number that finds it, and only it; else an occurrence number."""
    for reach in range(10, _REACH + 1, 2):
        for a, b in ((reach, reach // 3), (reach // 3, reach), (reach, reach)):
            lo, hi = max(0, mk.start - a), min(len(text), mk.end + b)
            before, after = text[lo : mk.start], text[mk.end : hi]
            if "«" in before + after or "»" in before + after:
                continue
            quote = f"{before}«{mk.printed}»{after}"
            hits = figures.occurrences(text, quote)
            if len(hits) == 1 and hits[0].start("fig") == mk.start:
                return quote, None
    before, after = text[max(0, mk.start - 12) : mk.start], text[mk.end : mk.end + 4]
    quote = f"{before}«{mk.printed}»{after}"
    starts = [h.start("fig") for h in figures.occurrences(text, quote)]
    return quote, starts.index(mk.start)


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def table(text: str, markers: list[Marker], page: str) -> str:
    """The page's figure table, as ``tests/figures.py`` reads it."""
    lines = [f"# Every number in {page}, tied to one JSON key (tests/figures.py reads this).",
             f"# Written by `python tests/render_page.py {Path(page).stem}` from docs/_src/{Path(page).name}: edit that.",
             "", "figure = ["]
    allow = ["allow = ["]
    for mk in markers:
        quote, nth = _quote(text, mk)
        fields = [f"quote = {_toml_str(quote)}"]
        if mk.source is None:
            fields.append(f"why = {_toml_str(mk.why or '')}")
        else:
            fields += [f"source = {_toml_str(mk.source)}", f"format = {_toml_str(mk.fmt or '')}"]
            if mk.transform:
                fields.append(f"transform = {_toml_str(mk.transform)}")
            if mk.over:
                fields.append(f"over = {_toml_str(mk.over)}")
        if nth is not None:
            fields.append(f"nth = {nth}")
        (allow if mk.source is None else lines).append("  { " + ", ".join(fields) + " },")
    return "\n".join([*lines, "]", "", *allow, "]", ""])


def from_page(page: str) -> str:
    """A template for an existing page: each number of its table written as a marker."""
    text = (ROOT / page).read_text(encoding="utf-8")
    tab = figures.load_table(page)
    spans: dict[tuple[int, int], str] = {}
    for kind in ("figure", "allow"):
        for e in tab[kind]:
            where = figures.locate(text, e["quote"], e.get("nth"))
            if isinstance(where, str):
                raise TemplateError(f"{e['quote']!r}: {where}")
            start, end, printed = where
            if kind == "allow":
                body = f"={printed}|{e['why']}"
            else:
                src = f"{e['source']}|{e['format']}" + (f"|{e['transform']}" if e.get("transform") else "")
                src += f"|over={e['over']}" if isinstance(e.get("over"), str) else ""
                expected = figures.render(figures.resolve(e["source"]), e["format"], e.get("transform"))
                body = src if printed == _minus(expected) and not e["format"].startswith("sci") else f"{printed}@{src}"
            spans.setdefault((start, end), body)
    out, pos = [], 0
    for (start, end), body in sorted(spans.items()):
        out += [text[pos:start], "{{" + body + "}}"]
        pos = end
    return "".join(out) + text[pos:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pages", nargs="+", help="page names (convergence), templates under docs/_src/")
    p.add_argument("--check", action="store_true", help="write nothing; fail if a page or table is stale")
    p.add_argument("--from-page", action="store_true", help="write a template from the page and its table")
    a = p.parse_args(argv)
    stale = []
    for name in a.pages:
        page = "README.md" if name == "README" else f"docs/{name}.md"
        tpl = TEMPLATES / f"{name}.md"
        toml = figures.TABLES / f"{name}.toml"
        if a.from_page:
            TEMPLATES.mkdir(exist_ok=True)
            tpl.write_text(from_page(page), encoding="utf-8")
            continue
        text, markers = render(tpl.read_text(encoding="utf-8"))
        tab = table(text, markers, page)
        if a.check:
            for path, want in ((ROOT / page, text), (toml, tab)):
                if not path.exists() or path.read_text(encoding="utf-8") != want:
                    stale.append(str(path.relative_to(ROOT)))
            continue
        (ROOT / page).write_text(text, encoding="utf-8")
        toml.write_text(tab, encoding="utf-8")
        problems = figures.check(text, figures.load_table(page))
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
    if stale:
        print(f"stale: {', '.join(stale)}; run python tests/render_page.py {' '.join(a.pages)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
