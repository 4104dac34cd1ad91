"""Learning curves from a training run directory (``elsa plot``).

The run directory holds ``metrics.jsonl``: one JSON object per epoch with keys epoch, train_loss, val_loss,
val_top1, val_top5, lr, images_per_s, skipped_images, epoch_time_s (missing keys are simply not drawn).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from ..io import save_png
from .common import PathLike, ToolError

_logger = logging.getLogger(__name__)


def read_metrics(run_dir: PathLike) -> list[dict]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (a path to the file itself also works), sorted by epoch.

    A torn last line (a run killed while writing) is skipped with a warning; any other bad line is an error."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ToolError(f"RUN_DIR: no metrics file {str(path)!r} (expected the directory `elsa train` wrote, "
                        f"holding metrics.jsonl)")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ToolError(f"RUN_DIR: {str(path)!r} is not a metrics file (binary data; expected the run directory "
                        f"of `elsa train` or its metrics.jsonl)") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                _logger.warning("%s: skipping the unfinished last line %d", path, n)
                continue
            raise ToolError(f"{path}: line {n} is not JSON: {err}") from err
        if not isinstance(record, dict):
            raise ToolError(f"{path}: line {n} is not a JSON object")
        records.append(record)
    if not records:
        raise ToolError(f"{path} holds no epochs yet (it is empty)")
    known = ("train_loss", "val_loss", "val_top1", "val_top5", "lr")
    if not any(k in r for r in records for k in known):
        raise ToolError(f"{path} is not a metrics file of `elsa train`: no record has any of {list(known)}")
    for i, r in enumerate(records):
        r.setdefault("epoch", i)
        if not isinstance(r["epoch"], (int, float)) or isinstance(r["epoch"], bool):
            raise ToolError(f"{path}: record {i + 1} has a non-numeric epoch {r['epoch']!r}")
    return sorted(records, key=lambda r: r["epoch"])


def _series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            xs.append(r["epoch"])
            ys.append(v)
    return xs, ys


def plot_curves(run_dir: PathLike, out: Optional[PathLike] = None, dpi: int = 110) -> Path:
    """Draw train/val loss, val top-1/top-5 and the learning rate against epoch; write a PNG (atomically) to
    ``out`` (default ``run_dir/curves.png``) and return its path."""
    records = read_metrics(run_dir)
    run = Path(run_dir)
    run = run if run.is_dir() else run.parent
    out = Path(out) if out is not None else run / "curves.png"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    # (key, label, line style); the *_ema series are written by `elsa train --model-ema`.
    panels = [
        ("loss", [("train_loss", "train", "-"), ("val_loss", "val", "-"), ("val_loss_ema", "val (EMA)", "--")], False),
        ("accuracy (%)", [("val_top1", "val top-1", "-"), ("val_top5", "val top-5", "-"),
                          ("val_top1_ema", "val top-1 (EMA)", "--"), ("val_top5_ema", "val top-5 (EMA)", "--")], False),
        ("learning rate", [("lr", "lr", "-")], True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (ylabel, keys, log) in zip(axes, panels):
        drawn = 0
        for key, label, style in keys:
            xs, ys = _series(records, key)
            if not xs:
                continue
            if key.startswith("val_top1"):
                best = max(range(len(ys)), key=ys.__getitem__)
                label = f"{label} (best {ys[best]:.2f} @ {xs[best]})"
            ax.plot(xs, ys, style, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        elif log:  # log scale only when the values span decades (warm-up from ~0, step decay)
            values = _series(records, keys[0][0])[1]
            if min(values) > 0 and max(values) / min(values) > 20:
                ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn > 1 or (drawn and len(keys) > 1):
            ax.legend(fontsize=8)
    fig.suptitle(f"{run.name}: {len(records)} epochs", fontsize=10)
    fig.tight_layout()
    save_png(fig, out, dpi=dpi)
    _logger.info("wrote %s", out)
    return out


__all__ = ["plot_curves", "read_metrics"]
