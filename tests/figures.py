"""Every figure quoted in README.md and docs/*.md, tied to one JSON key: the checker.

Each page has a table, ``docs/_numbers/<page>.toml``, with two lists:

``figure``
    one entry per quoted number: ``quote`` is the text around it on the page with the number
    between ``«`` and ``»``; ``source`` is ``<file under benchmarks/results>#<JSON pointer>``;
    ``format`` is the Python format spec the page prints it with (``.3f``, ``+.3f``, ``d``, ``g``,
    ``,d``; ``sci`` for ``3.0·10⁻³``), and ``transform`` (optional) one of :data:`TRANSFORMS`,
    applied to the stored value before formatting.
``allow``
    numbers on the page that are not results (a setting, a size, a paper's year): ``quote`` as
    above and ``why``.

The checker finds each quote on the page (exactly once, or the ``nth`` match), reads the number
printed there and compares it, as printed, with the stored value formatted as stated: a changed
digit, a flipped sign or a changed count reads differently. Then every number token in the
page's prose and tables must be one of the entries' numbers, or an allowed one, or match one of
the few :data:`NOT_FIGURES` patterns (versions, years, arXiv ids, list numbering). Fenced code
blocks and inline code are not prose: the ``python`` blocks run in tests/test_docs.py, the
demo's printed table is compared with its JSON in tests/test_readme_numbers.py.

:func:`check` takes the page's *text*, so a test can hand it an edited copy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TABLES = ROOT / "docs" / "_numbers"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

_SUP = "⁰¹²³⁴⁵⁶⁷⁸⁹"
#: A number as the pages print it: sign, digits (thousands with commas), decimals, an e-exponent,
#: or a power written with superscripts (``3.0·10⁻³``, ``10⁻²``, ``2⁴``).
NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-+−]?)(?P<num>\d{1,3}(?:,\d{3})+(?![\d])|\d+(?:\.\d+)?)"
    rf"(?P<exp>e[-+]?\d+|(?:·10)?⁻?[{_SUP}]+)?"
)
#: Numbers that are never results, whatever the page: versions (x.y.z, or torch 2.13), years in
#: citations, arXiv ids, ICML/ICLR years, numbered list items and headings.
NOT_FIGURES = [
    re.compile(r"\b\d+\.\d+\.\d+\b"),  # version numbers: peft 0.21.2, Python 3.11.7
    re.compile(r"(?:torch|Python|pytorch-optimizer|PEFT|peft|transformers|Linux) ?[≥>=]* ?\d+(?:\.\d+)*"),
    re.compile(r"\b(?:ICML|ICLR|NeurIPS|arXiv) ?\d{4}(?:\.\d{4,5})?"),
    re.compile(r"(?m)^ *(?:#+ )?\d+\. "),  # numbered lists and headings
    re.compile(r"95 %"),  # the confidence level of every interval, a setting
    re.compile(r"\b[Ss]tudy [12]\b"),  # the studies' names
    # a setting written as name = value: λ=4, r = 8, t = 200, n = 64, d = 5
    re.compile(r"(?<![\w])(?:λ|r|α|t|n|d|s|A|B)\s?=\s?\d+(?:\.\d+)?(?!\d|\.\d)"),
]

TRANSFORMS: dict[str, Callable[[float], float]] = {
    "abs": abs,  # the page says "lower by 0.08" for a difference of -0.08
    "percent": lambda v: 100 * v,  # a stored fraction printed in per cent
    "minutes": lambda v: v / 60,  # a stored number of seconds printed in minutes
    "hours": lambda v: v / 3600,  # seconds printed in hours
    "ms": lambda v: 1000 * v,  # seconds printed in milliseconds
    "us": lambda v: 1e6 * v,  # seconds printed in microseconds
    "mib": lambda v: v / 2**20,  # bytes printed in MiB
}


@dataclass(frozen=True)
class Token:
    start: int
    end: int
    text: str

    @property
    def value(self) -> float:
        return parse(self.text)


def parse(text: str) -> float:
    """The value of a printed number (``−0.083``, ``1,440``, ``3.0·10⁻³``, ``2⁴``, ``3e-4``)."""
    m = NUMBER.fullmatch(text)
    if not m:
        raise ValueError(f"not a number: {text!r}")
    sign = -1.0 if m["sign"] in "-−" and m["sign"] else 1.0
    num = float(m["num"].replace(",", ""))
    exp = m["exp"] or ""
    if exp.startswith("e"):
        return sign * num * 10 ** int(exp[1:])
    if exp:
        power = int(exp.lstrip("·10").replace("⁻", "-").translate(str.maketrans(_SUP, "0123456789")))
        return sign * (num * 10.0**power if exp.startswith("·10") else num**power)
    return sign * num


def _mask(text: str) -> str:
    """The page with everything that is not prose blanked out (same length, so offsets hold)."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    text = re.sub(r"(?ms)^```.*?^```", blank, text)  # fenced code blocks
    text = re.sub(r"`[^`]+`", blank, text)  # inline code (may wrap a line)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = re.sub(r"\]\([^)\s]*\)", blank, text)  # link targets
    text = re.sub(r"\(img/[^)]*\)|\(docs/[^)]*\)", blank, text)
    for pattern in NOT_FIGURES:
        text = pattern.sub(blank, text)
    return text


def tokens(text: str) -> list[Token]:
    """Every number in the page's prose and tables."""
    masked = _mask(text)
    return [Token(m.start(), m.end(), m.group(0)) for m in NUMBER.finditer(masked)]


@cache
def _quote_regex(quote: str) -> tuple[re.Pattern, str, str]:
    """The quote as a pattern (its «number» a number wildcard), and its literal text before/after."""
    before, sep, rest = quote.partition("«")
    inner, sep2, after = rest.partition("»")
    if not sep or not sep2 or "«" in after or "»" in before:
        raise ValueError(f"a quote marks exactly one number with «…»: {quote!r}")
    pattern = re.compile(re.escape(before) + r"(?P<fig>" + NUMBER.pattern + r")" + re.escape(after))
    return pattern, before, after


def occurrences(text: str, quote: str) -> list[re.Match]:
    pattern, before, after = _quote_regex(quote)
    anchor = before if len(before) >= len(after) else after
    if not anchor:
        return list(pattern.finditer(text))
    hits, seen, i = [], set(), text.find(anchor)
    while i >= 0:  # only try the pattern where its longer literal part occurs (fast on long pages)
        lo = i if anchor is before else max(0, i - len(before) - 40)
        m = pattern.search(text, lo, i + len(anchor) + (40 if anchor is before else 0) + len(after))
        if m and m.start() not in seen and (anchor is not before or m.start() == i):
            seen.add(m.start())
            hits.append(m)
        i = text.find(anchor, i + 1)
    return sorted(hits, key=lambda m: m.start())


def locate(text: str, quote: str, nth: int | None = None) -> tuple[int, int, str] | str:
    """Where the «number» of ``quote`` is on the page: (start, end, printed), or what is wrong."""
    hits = occurrences(text, quote)
    if nth is not None:
        if nth >= len(hits):
            return f"quote found {len(hits)} times, entry wants occurrence {nth}"
        hit = hits[nth]
    elif len(hits) != 1:
        return f"quote found {len(hits)} times (must be once, or give nth)"
    else:
        hit = hits[0]
    return hit.start("fig"), hit.end("fig"), hit.group("fig")


@cache
def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def resolve(source: str) -> Any:
    """The value at ``file.json#/json/pointer`` (RFC 6901: ``~1`` is ``/``, ``~0`` is ``~``)."""
    name, _, pointer = source.partition("#")
    value = _load(name)
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def render(value: Any, fmt: str, transform: str | None = None) -> str:
    """The stored value as the page must print it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if transform == "len" and isinstance(value, (list, dict)):
            value = len(value)
        else:
            raise TypeError(f"not a number: {value!r}")
    elif transform:
        value = TRANSFORMS[transform](value)
    if fmt.startswith("sci"):  # compared as a value at the printed mantissa's precision (see same_printed)
        return repr(float(value))
    if fmt.endswith("d") and isinstance(value, float):
        if value != int(value):
            raise TypeError(f"{value!r} printed as an integer")
        value = int(value)
    return format(value, fmt)


def same_printed(printed: str, expected: str, fmt: str) -> bool:
    def norm(s: str) -> str:
        return s.replace("−", "-")

    if fmt.startswith("sci"):  # 3.0·10⁻³: same value at the printed mantissa's precision, same sign
        m = NUMBER.fullmatch(printed)
        decimals = len(m["num"].split(".")[1]) if m and "." in m["num"] else 0
        p, e = parse(printed), float(expected)
        scale = abs(p) / abs(float(m["num"])) if m and float(m["num"]) else 1.0
        return math.copysign(1, p) == math.copysign(1, e) and abs(p - e) <= 0.5 * 10**-decimals * scale * (1 + 1e-9)
    return norm(printed) == norm(expected)


def load_table(page: str) -> dict[str, list[dict[str, Any]]]:
    path = TABLES / (Path(page).stem + ".toml")
    if not path.exists():
        return {"figure": [], "allow": []}
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return {"figure": data.get("figure", []), "allow": data.get("allow", [])}


def check(text: str, table: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Everything wrong with the figures of one page's ``text`` against its ``table``."""
    problems: list[str] = []
    covered: set[tuple[int, int]] = set()
    for kind in ("figure", "allow"):
        for e in table[kind]:
            try:
                where = locate(text, e["quote"], e.get("nth"))
            except ValueError as err:
                where = str(err)
            if isinstance(where, str):
                problems.append(f"{kind} {e['quote']!r}: {where}")
                continue
            start, end, printed = where
            covered.add((start, end))
            if kind == "allow":
                continue
            try:
                value = resolve(e["source"])
                expected = render(value, e["format"], e.get("transform"))
            except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as err:
                problems.append(f"{e['quote']!r}: {e['source']}: {type(err).__name__}: {err}")
                continue
            if not same_printed(printed, expected, e["format"]):
                problems.append(f"{e['quote']!r} prints {printed}, {e['source']} gives {expected}")
    for tok in tokens(text):
        if (tok.start, tok.end) not in covered and not any(s <= tok.start and tok.end <= t for s, t in covered):
            line = text.count("\n", 0, tok.start) + 1
            ctx = text[max(0, tok.start - 30) : tok.end + 30].replace("\n", " ")
            problems.append(f"line {line}: {tok.text!r} has no entry (…{ctx}…)")
    return problems


def check_page(page: str) -> list[str]:
    return check((ROOT / page).read_text(encoding="utf-8"), load_table(page))
