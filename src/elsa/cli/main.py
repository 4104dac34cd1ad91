"""The ``elsa`` command. Each subcommand lives in its own module under ``elsa.cli`` and exposes
``add_parser(subparsers)``, which registers its arguments and sets ``func`` (args -> exit code)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

# Subcommand modules, in the order `elsa --help` lists them. Each is imported lazily only for its parser.
SUBCOMMANDS = [
    "elsa.cli.models",
    "elsa.cli.convert",
    "elsa.cli.export",
    "elsa.cli.train",
    "elsa.cli.validate",
    "elsa.cli.predict",
    "elsa.cli.visualize",
    "elsa.cli.plot",
    "elsa.cli.seg",
    "elsa.cli.det",
    "elsa.cli.benchmark",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elsa", description="Enhanced Local Self-Attention: models, training, tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (e.g. while importing): one line
        print("elsa: interrupted", file=sys.stderr)
        return 130


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
