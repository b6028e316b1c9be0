"""One plain-text table renderer for the whole package (explain(), the Monitor's summary, the demo)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["render_table"]


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
