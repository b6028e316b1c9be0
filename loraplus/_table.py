"""One table renderer for the whole package (explain(), the Monitor's summary, the demo, generated docs tables)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["render_markdown_table", "render_table"]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """Aligned columns: a header line, a line of dashes, one line per row; two spaces between columns.

    Cells are left-aligned, those of the columns in ``right`` right-aligned; trailing spaces are
    stripped from every line.

    Example:
        >>> print(render_table(["name", "n"], [["a", "1"], ["bcd", "22"]], right={1}))
        name   n
        ----  --
        a      1
        bcd   22
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table as a Markdown (GitHub/mkdocs) table, for the pages in docs/ that are generated.

    Example:
        >>> print(render_markdown_table(["name", "n"], [["a", "1"]]))
        | name | n |
        |---|---|
        | a | 1 |
    """
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)])
