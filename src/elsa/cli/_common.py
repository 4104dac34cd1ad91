"""What every ``elsa`` subcommand shares: one way to report a user error, and recipe overrides from a flag table.

A user error (a bad argument, a missing or unreadable file, data that does not fit) is printed as ONE line,
``elsa COMMAND: error: MESSAGE`` (the message names the argument), on stderr, with exit code 2 and no traceback
(``-v`` logs the traceback at debug level). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import functools
import logging
import sys
from typing import Any, Callable, Dict, Mapping, Tuple, Union

_logger = logging.getLogger("elsa.cli")

# ValueError covers CheckpointError, DatasetError and ToolError; FileNotFoundError a missing path given by the user;
# ModuleNotFoundError an optional dependency the chosen flags need (e.g. tensorboard).
USER_ERRORS: Tuple[type, ...] = (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError)

Command = Callable[[argparse.Namespace], Any]


# Optional packages -> the extra of `pip install elsa[EXTRA]` that brings them (anything else: pip install NAME).
EXTRAS = {"pycocotools": "det", "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
          "tensorboard": "tensorboard", "sklearn": "(core)", "matplotlib": "(core)"}

# OSErrors that are the user's environment (a full disk, a read-only or forbidden folder), not a bug.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.EEXIST,
                       errno.ENOTDIR, errno.ENAMETOOLONG)


def describe_error(err: BaseException) -> str:
    """The one line for a user error: its message, with the pip command for a missing package."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        top = err.name.split(".")[0]
        extra = EXTRAS.get(top)
        if extra == "(core)":
            hint = f"pip install {top if top != 'sklearn' else 'scikit-learn'} (a core dependency of elsa)"
        elif extra:
            hint = f"pip install 'elsa[{extra}]' (or pip install {top})"
        else:
            hint = f"pip install {top}"
        return f"{err} - this needs the optional package {top!r}: {hint}"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        where = f" ({err.filename})" if err.filename and str(err.filename) not in err.strerror else ""
        return f"{err.strerror}{where}"
    return str(err) or type(err).__name__


def command(name: str) -> Callable[[Command], Command]:
    """Decorate a subcommand's ``func``: its user errors become ``elsa NAME: error: ...`` and exit code 2; Ctrl-C
    becomes one line (with the ``--resume`` command when training) and exit code 130; ``--threads`` is applied."""

    def wrap(func: Command) -> Command:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            try:
                apply_threads(args)
                return int(func(args) or 0)
            except KeyboardInterrupt as err:
                _logger.debug("details", exc_info=True)
                print(f"elsa {name}: {err or 'interrupted'}", file=sys.stderr)
                return 130
            except OSError as err:
                if isinstance(err, USER_ERRORS) or err.errno in _ENVIRONMENT_ERRNOS:
                    _logger.debug("details", exc_info=True)
                    print(f"elsa {name}: error: {describe_error(err)}", file=sys.stderr)
                    return 2
                raise
            except USER_ERRORS as err:
                _logger.debug("details", exc_info=True)
                print(f"elsa {name}: error: {describe_error(err)}", file=sys.stderr)
                return 2

        return run

    return wrap


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on a compute command (applied by ``command`` before the command runs)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads`` for a command given ``--threads``."""
    threads = getattr(args, "threads", None)
    if isinstance(threads, int) and threads > 0:
        import torch

        torch.set_num_threads(threads)


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


def _parsed(text: str, kind: type) -> float:
    """``kind(text)`` (int or float), or the argparse error that says what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _parsed(text, float)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _parsed(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = _parsed(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
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
