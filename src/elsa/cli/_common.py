"""What every ``elsa`` subcommand shares: one way to report a user error, and recipe overrides from a flag table.

A user error (a bad argument, a missing or unreadable file, data that does not fit) is printed as ONE line,
``elsa COMMAND: error: MESSAGE`` (the message names the argument), on stderr, with exit code 2 and no traceback
(``-v`` logs the traceback at debug level). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any, Callable, Dict, Mapping, Tuple, Union

_logger = logging.getLogger("elsa.cli")

# ValueError covers CheckpointError, DatasetError and ToolError; FileNotFoundError a missing path given by the user;
# ModuleNotFoundError an optional dependency the chosen flags need (e.g. tensorboard).
USER_ERRORS: Tuple[type, ...] = (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError)

Command = Callable[[argparse.Namespace], Any]


def command(name: str) -> Callable[[Command], Command]:
    """Decorate a subcommand's ``func``: its user errors become ``elsa NAME: error: ...`` and exit code 2."""

    def wrap(func: Command) -> Command:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            try:
                return int(func(args) or 0)
            except USER_ERRORS as err:
                _logger.debug("details", exc_info=True)
                print(f"elsa {name}: error: {err}", file=sys.stderr)
                return 2

        return run

    return wrap


# A flag table maps an argparse dest to a recipe field, or to (field, value) for switches (store_true flags).
FlagTable = Mapping[str, Union[str, Tuple[str, Any]]]


def recipe_overrides(args: argparse.Namespace, table: FlagTable) -> Dict[str, Any]:
    """``{field: value}`` for the flags of ``table`` given on the command line (None / False means not given)."""
    changes: Dict[str, Any] = {}
    for dest, target in table.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if isinstance(target, tuple):
            field, value = target
        else:
            field = target
        changes[field] = value
    if "amp_dtype" in changes:  # naming an autocast dtype asks for mixed precision
        changes.setdefault("amp", True)
    return changes


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> Tuple[int, ...]:
    """argparse type: comma-separated positive integers (``480,512,544``)."""
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def int_pair(text: str) -> Tuple[int, int]:
    """argparse type: ``N`` (square) or ``A,B`` / ``AxB`` with positive integers."""
    values = int_list(text.replace("x", ","))
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected N or A,B with positive integers, got {text!r}")
    return values  # type: ignore[return-value]


def float_list(text: str) -> Tuple[float, ...]:
    """argparse type: comma-separated positive numbers (``0.5,1.0,1.5``)."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def json_object(text: str) -> dict:
    """argparse type: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
