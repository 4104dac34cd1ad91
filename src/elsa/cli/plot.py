"""`elsa plot`: learning curves (train/val loss, val top-1/top-5, learning rate) of a training run, as a PNG."""
from __future__ import annotations

import argparse

from ._common import command


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="learning curves of a training run as a PNG", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory of `elsa train` (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    p.set_defaults(func=command("plot")(run))


def run(args: argparse.Namespace) -> int:
    from ..tools import ToolError, plot_curves

    if args.out is not None and not args.out.lower().endswith(".png"):
        raise ToolError(f"--out: the curves are written as PNG; give a .png file name, got {args.out!r}")
    out = plot_curves(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
