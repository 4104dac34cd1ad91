"""Where a new run writes: never into a folder that already holds another run, unless asked to overwrite.

As timm's train.py (``get_outdir(inc=True)``), a taken folder NAME gives way to the first free NAME-1, NAME-2, ...
and the log says so; every task's ``train`` command uses this one rule."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

_logger = logging.getLogger(__name__)


def holds_run(folder: Path, run_files: Sequence[str]) -> bool:
    """Whether ``folder`` holds any of a run's result files."""
    return any((folder / name).exists() for name in run_files)


def free_run_dir(folder: Path, run_files: Sequence[str], overwrite: bool = False, resume_hint: str = "") -> Path:
    """``folder`` if it holds no run (or ``overwrite``), else the first ``folder-N`` that holds none."""
    folder = Path(folder)
    if not holds_run(folder, run_files):
        return folder
    if overwrite:
        _logger.warning("--overwrite: replacing the earlier run in %s", folder)
        return folder
    n = 1
    while holds_run(folder.with_name(f"{folder.name}-{n}"), run_files):
        n += 1
    new = folder.with_name(f"{folder.name}-{n}")
    _logger.warning("%s already holds a run (%s); this run goes to %s instead (pass --overwrite to replace it%s)",
                    folder, ", ".join(f for f in run_files if (folder / f).exists()), new, resume_hint)
    return new
