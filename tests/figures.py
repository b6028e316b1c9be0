"""Every figure quoted in README.md and docs/*.md, tied to one JSON key: the checker.

Each page has a table, ``docs/_numbers/<page>.toml``, with two lists:

``figure``
    one entry per quoted number: ``quote`` is the text around it on the page with the number
    between ``«`` and ``»``; ``source`` is ``<file under benchmarks/>#<JSON pointer>`` (a study's ``studies/v2/results/summary.json``);
    ``format`` is the Python format spec the page prints it with (``.3f``, ``+.3f``, ``d``, ``g``,
    ``,d``; ``sci`` for ``3.0·10⁻³``), and ``transform`` (optional) one of :data:`TRANSFORMS`,
    applied to the stored value before formatting.
    A range whose ends summarise a set (``λ=2, 16, 32 trail by 0.03–0.04``, ``2.3–2.8× at every
    size``) names that set with ``over`` on either end's entry: a source pattern (see :func:`expand`:
    ``*`` for every key at one level, ``[a,b]`` for the keys named) or a list of sources. The printed
    ends must then be the smallest and the largest member as printed, so every member lies inside.
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
#: the folder every source is named relative to (``studies/<study>/results/``, ``perf/results/``, ...)
BENCHMARKS = ROOT / "benchmarks"


def result_files() -> list[Path]:
    """Every committed result JSON: the files under a ``results/`` folder anywhere in benchmarks/."""
    return sorted(p for p in BENCHMARKS.rglob("*.json") if "results" in p.relative_to(BENCHMARKS).parts[:-1])
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
    # a library's version: at least major.minor (``PEFT 0.21.2``, ``torch 2.13``), so a result after a
    # library's name (``PEFT 70.0×``, ``PEFT 3``) is still a figure
    re.compile(r"(?:torch|Python|pytorch-optimizer|PEFT|peft|transformers|TRL|Linux) ?[≥>=]* ?\d+\.\d+(?:\.\d+)*(?![\d×%]|\.\d)"),
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

#: Transforms of a stored list: its length, or how many per-seed differences (method − plain
#: LoRA, in loss) are below or above zero — "lower on 3 of 5 seeds", "higher on 2 of 5".
LIST_TRANSFORMS: dict[str, Callable[[list[Any]], int]] = {
    "len": len,
    "lower": lambda xs: sum(1 for x in xs if x < 0),
    "higher": lambda xs: sum(1 for x in xs if x > 0),
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
    return json.loads((BENCHMARKS / name).read_text(encoding="utf-8"))


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
        if transform == "len" and isinstance(value, dict):
            value = len(value)
        elif transform in LIST_TRANSFORMS and isinstance(value, list):
            value = LIST_TRANSFORMS[transform](value)
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
    located = []
    for e in table["figure"]:
        try:
            where = locate(text, e["quote"], e.get("nth"))
        except ValueError:
            continue
        if not isinstance(where, str):
            located.append((where[0], where[1], e))
    located.sort(key=lambda x: x[0])
    problems += _wrong_labels(text, located) + _wrong_counts(text, located) + _wrong_ranges(text, located)
    return problems


# --------------------------------------------------------------------------- what a figure means

#: How a page names LoRA+ ratios: ``λ=4``, ``λ = 16``, ``ratio 4``, a list ``λ = 4, 16 and 32`` or a
#: span ``λ=2 to 8``.
LABEL = re.compile(r"(?:λ\s?=\s?|\bratio\s)(?P<list>\d+(?:(?:,\s?|\s(?:and|or|to)\s|–)\d+(?![\d.,]\d))*)(?![\d.,]\d)")
#: Words that make the label after them the comparison, not the figure's method: "than λ=1", "vs λ=1".
COMPARATOR = re.compile(r"(?:than|vs\.?|against|ties|over|to|with)\s$")
#: A label right after a figure names it: "+0.17 at λ=4", "0.0014 for λ=16".
LABEL_AFTER = re.compile(r"\s?[%×]?\s(?:at|for|with)\s(?=λ|ratio\s)")


def label_ratios(label: re.Match) -> set[float] | tuple[float, float]:
    """The ratios a label names: a set, or an inclusive span for ``λ=2 to 8``."""
    text = label["list"]
    nums = [float(n) for n in re.findall(r"\d+", text)]
    if len(nums) == 2 and re.search(r"\sto\s|–", text):
        return (nums[0], nums[1])
    return set(nums)


def _names(ratios: set[float] | tuple[float, float], ratio: float) -> bool:
    return ratios[0] <= ratio <= ratios[1] if isinstance(ratios, tuple) else ratio in ratios


#: Where a sentence, list item or table cell begins: a label before it names another clause's figure
#: (a table's label cell is not read: a row compares ratios across its cells).
CLAUSE_START = re.compile(r"[.!?;](?=\s)|\n\s*\n|\||\n\s*[-*] ")
#: A JSON pointer segment that names a LoRA+ ratio: ``loraplus16``, ``riemannian4_reg1e-06``,
#: ``riemannian_loraplus4`` (study keys) or ``4.0`` (a ratio as a key, as the sweeps store them).
RATIO_SEGMENT = re.compile(r"(?:loraplus|riemannian_loraplus|riemannian)(?P<a>\d+)(?:_.*)?|(?P<b>\d+)\.0")


def method_ratio(source: str) -> float | None:
    """The LoRA+ ratio the figure at ``source`` belongs to, when the source says: a segment of its
    pointer, or the ``ratio`` field of the deepest object on its path (the demo's summaries)."""
    name, _, pointer = source.partition("#")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    for part in reversed(parts):
        m = RATIO_SEGMENT.fullmatch(part)
        if m:
            return float(m["a"] or m["b"])
    ratio, value = None, _load(name)
    for part in parts:
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            break
        if isinstance(value, dict) and isinstance(value.get("ratio"), (int, float)):
            ratio = float(value["ratio"])
    return ratio


def _clause_start(text: str, at: int) -> int:
    starts = [m.end() for m in CLAUSE_START.finditer(text, 0, at)]
    return starts[-1] if starts else 0


def _wrong_labels(text: str, located: list[tuple[int, int, dict[str, Any]]]) -> list[str]:
    """A figure of one ratio's run quoted next to a label naming another ratio, in the same clause.

    The label is the one right after the figure ("+0.17 at λ=4"), else the nearest one before it in
    its sentence, list item or table row, skipping comparisons ("than λ=1"). Figures of plain LoRA's
    own runs (ratio 1) are quoted as the comparison inside other ratios' sentences, and a figure that
    is itself a ratio is the label: neither is checked here."""
    problems = []
    for start, end, e in located:
        ratio = method_ratio(e["source"])
        if ratio is None or ratio == 1 or e["source"].endswith("/ratio"):
            continue
        after = LABEL_AFTER.match(text, end)
        label = LABEL.match(text, after.end()) if after else None
        if label is None:
            before = [m for m in LABEL.finditer(text, _clause_start(text, start), start)
                      if not COMPARATOR.search(text[max(0, m.start() - 10) : m.start()])]
            label = before[-1] if before else None
        if label is not None and not _names(label_ratios(label), ratio):
            problems.append(f"{e['quote']!r}: {e['source']} is ratio {ratio:g}'s, but the text names "
                            f"{label.group(0)!r}")
    return problems


@dataclass(frozen=True)
class CountRule:
    """What a count means by the words around it, and which sources can hold that count."""

    before: re.Pattern
    after: re.Pattern
    meaning: str
    sources: tuple[str, ...]  # pointer endings that hold it
    transforms: tuple[str, ...]  # or list transforms that compute it


COUNT_RULES = (
    CountRule(re.compile(r"(?:lower|better|ahead|won|wins?)\s+on\s+(?:all\s+)?$"), re.compile(r""),
              "seeds on which the method ended lower (a wins count)", ("/wins", "/wins_vs_lora"), ("lower",)),
    CountRule(re.compile(r"(?:^|[\s|(\[])$"), re.compile(r"^/\d+ wins"),
              "seeds on which the method ended lower (a wins count)", ("/wins", "/wins_vs_lora"), ("lower",)),
    CountRule(re.compile(r"(?:worse|higher|lost|behind|trailed)\s+on\s+(?:all\s+)?$"), re.compile(r""),
              "seeds on which the method ended higher (a losses count)", ("/losses",), ("higher",)),
    CountRule(re.compile(r"\d+\s?(?:of|/)\s?$"), re.compile(r"^\s?(?:paired\s)?seeds\b"),
              "the number of seeds compared", ("/n", "/seeds", "/seed_ids", "/per_seed"), ("len",)),
)


def _wrong_counts(text: str, located: list[tuple[int, int, dict[str, Any]]]) -> list[str]:
    """A count tied to a key that does not hold what its words say (``worse on 3`` tied to the seed count)."""
    problems = []
    for start, end, e in located:
        before, after = text[max(0, start - 40) : start], text[end : end + 40]
        for rule in COUNT_RULES:
            if rule.before.search(before) and rule.after.search(after):
                src, tf = e["source"], e.get("transform")
                fits = tf in rule.transforms if tf else src.endswith(rule.sources)
                if not fits:
                    problems.append(f"{e['quote']!r} counts {rule.meaning}, but {src}"
                                    f"{'|' + tf if tf else ''} does not hold that")
                break
    return problems


#: The text between the two ends of a quoted range (``+0.2 % to +1.2 %``, ``1.5–3×``).
RANGE_JOIN = re.compile(r"\s?[%×]?\s?(?:–|to)\s?")


def range_members(low: str, high: str) -> list[str]:
    """The sources a range quoted as ``low``–``high`` stands for, when its ends are the same key in
    sibling files (``find_lr/width256.json`` and ``find_lr/width64.json``: every ``find_lr/width*.json``).
    Ends in one file (an interval's bounds, a min and a max) stand only for themselves."""
    (fa, _, pa), (fb, _, pb) = low.partition("#"), high.partition("#")
    if fa == fb or pa != pb:
        return [low, high]
    a, b = Path(fa), Path(fb)
    if a.parent != b.parent:
        return [low, high]
    stem_a, stem_b = a.stem, b.stem
    k = 0
    while k < min(len(stem_a), len(stem_b)) and stem_a[k] == stem_b[k]:
        k += 1
    j = 0
    while j < min(len(stem_a), len(stem_b)) - k and stem_a[-1 - j] == stem_b[-1 - j]:
        j += 1
    pattern = stem_a[:k] + "*" + (stem_a[len(stem_a) - j :] if j else "") + a.suffix
    return [f"{p.relative_to(BENCHMARKS).as_posix()}#{pa}" for p in sorted((BENCHMARKS / a.parent).glob(pattern))]


#: A pointer segment that stands for several keys: ``*`` (every key or index there) or ``[a,b,c]``.
_ALTERNATIVES = re.compile(r"\[(?P<keys>[^\[\]]+)\]")


def expand(pattern: str | list[str]) -> list[str]:
    """The sources a set pattern stands for, in order: the file part may hold a glob
    (``find_lr/width*.json``); a pointer segment ``*`` is every key (index) at that level that has
    the rest of the path with a non-null value, ``[2.0,16.0]`` exactly those keys (which must
    exist). A list is a union."""
    if isinstance(pattern, list):
        return [src for p in pattern for src in expand(p)]
    name, _, pointer = pattern.partition("#")
    files = ([p.relative_to(BENCHMARKS).as_posix() for p in sorted(BENCHMARKS.glob(name))] if "*" in name else [name])
    out: list[str] = []
    for f in files:
        # (pointer so far, segments left, whether a ``*`` above may drop this path when it lacks the rest)
        todo: list[tuple[str, list[str], bool]] = [("", pointer.split("/")[1:], False)]
        while todo:
            done, rest, optional = todo.pop(0)
            if not rest:
                try:
                    leaf = resolve(f"{f}#{done}")
                except (KeyError, IndexError, TypeError, ValueError):
                    if optional:
                        continue  # a key under ``*`` without the rest of the path: not a member
                    raise
                if leaf is None and optional:
                    continue  # nor one whose value is null (not measured: a probe that found no edge)
                out.append(f"{f}#{done}")
                continue
            head, tail = rest[0], rest[1:]
            alt = _ALTERNATIVES.fullmatch(head)
            if head == "*":
                try:
                    value = resolve(f"{f}#{done}")
                except (KeyError, IndexError, TypeError, ValueError):
                    if optional:
                        continue
                    raise
                if not isinstance(value, (list, dict)):
                    if optional:
                        continue
                    raise TypeError(f"{f}#{done} is neither an object nor a list: no * below it")
                keys = [str(i) for i in range(len(value))] if isinstance(value, list) else list(value)
                todo += [(f"{done}/{k.replace('~', '~0').replace('/', '~1')}", tail, True) for k in keys]
            elif alt:
                todo += [(f"{done}/{k.strip()}", tail, optional) for k in alt["keys"].split(",")]
            else:
                todo.append((f"{done}/{head}", tail, optional))
    return out


def _wrong_ranges(text: str, located: list[tuple[int, int, dict[str, Any]]]) -> list[str]:
    """Every member of a quoted range lies inside it, at the precision printed; a range that names
    its set (``over``) prints that set's smallest and largest member as its ends."""
    problems = []
    ends: set[int] = set()
    for i, ((s1, e1, lo), (s2, e2, hi)) in enumerate(zip(located, located[1:])):
        if not RANGE_JOIN.fullmatch(text[e1:s2]):
            continue
        if lo.get("transform") != hi.get("transform") or lo["format"] != hi["format"]:
            continue
        named = [e["over"] for e in (lo, hi) if e.get("over")]
        if named:
            ends |= {i, i + 1}
            problems += _wrong_set(text[s1:e2], parse(text[s1:e1]), parse(text[s2:e2]), lo, hi, named)
            continue
        members = range_members(lo["source"], hi["source"])
        if len(members) <= 2:
            continue
        bounds = sorted((parse(text[s1:e1]), parse(text[s2:e2])))
        for src in members:
            try:
                shown = parse(render(resolve(src), lo["format"], lo.get("transform")))
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if not bounds[0] <= shown <= bounds[1]:
                problems.append(f"{text[s1:e2]!r}: {src} prints {shown:g}, outside the range")
    for i, (_, _, e) in enumerate(located):
        if e.get("over") and i not in ends:
            problems.append(f"{e['quote']!r} names a set ({e['over']}) but is not an end of a quoted range")
    return problems


def _wrong_set(quoted: str, low: float, high: float, lo: dict[str, Any], hi: dict[str, Any],
               named: list[Any]) -> list[str]:
    """The problems of a range ``low``–``high`` that summarises the set ``named``."""
    try:
        members = list(dict.fromkeys(src for over in named for src in expand(over)))
    except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as err:
        return [f"{quoted!r}: its set {named}: {type(err).__name__}: {err}"]
    if len(members) < 2:  # the ends' own sources may lie outside the set (a stored min and max of it)
        return [f"{quoted!r}: its set {named} has {len(members)} member(s), not a range"]
    problems: list[str] = []
    shown: dict[str, float] = {}
    for src in members:
        try:
            shown[src] = parse(render(resolve(src), lo["format"], lo.get("transform")))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            problems.append(f"{quoted!r}: {src}: {type(err).__name__}: {err}")
    if not shown:
        return problems
    bounds = sorted((low, high))
    problems += [f"{quoted!r}: {src} prints {v:g}, outside the range" for src, v in shown.items()
                 if not bounds[0] <= v <= bounds[1]]
    smallest, largest = min(shown.values()), max(shown.values())
    if (smallest, largest) != tuple(bounds) and not problems:
        problems.append(f"{quoted!r}: its set's members print {smallest:g} to {largest:g}, not the range's ends")
    return problems


def check_page(page: str) -> list[str]:
    return check((ROOT / page).read_text(encoding="utf-8"), load_table(page))
