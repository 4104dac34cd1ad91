"""Per-epoch metrics of a run: RUN_DIR/metrics.jsonl and RUN_DIR/metrics.csv (read by ``elsa plot``), and
optional TensorBoard events under RUN_DIR/events.

Why rewrite instead of append: both files are rewritten atomically each epoch from the rows in memory, so a kill
never leaves a half line, and a resumed run drops the rows of epochs it repeats.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List

from ..io import atomic_write_text

_logger = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s",
                  "skipped_images", "epoch_time_s"]


def require_tensorboard():
    """``SummaryWriter`` for ``--log-tensorboard``; a clear error when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError) as err:
        raise ModuleNotFoundError("--log-tensorboard needs the tensorboard package (pip install tensorboard); "
                           f"importing torch.utils.tensorboard failed: {err}") from err
    return SummaryWriter


def tensorboard_writer(log_dir: os.PathLike):
    """A TensorBoard writer logging to ``log_dir``."""
    return require_tensorboard()(log_dir=str(log_dir))


class MetricsLog:
    """Collects one row per epoch and keeps metrics.jsonl / metrics.csv (and TensorBoard) up to date."""

    def __init__(self, run_dir: os.PathLike, tensorboard: bool = False, start_epoch: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.rows: List[Dict[str, Any]] = []
        jsonl = self.run_dir / "metrics.jsonl"
        if start_epoch > 0 and jsonl.is_file():  # resumed: keep the rows of the epochs already done
            with open(jsonl) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        row = json.loads(line)
                        if int(row.get("epoch", 0)) <= start_epoch:
                            self.rows.append(row)
        self.writer = tensorboard_writer(self.run_dir / "events") if tensorboard else None

    def columns(self) -> List[str]:
        extra = sorted({k for r in self.rows for k in r} - set(METRIC_COLUMNS))
        return METRIC_COLUMNS + extra

    def add(self, row: Dict[str, Any]) -> None:
        """Record one epoch's row (keys: ``METRIC_COLUMNS`` plus optional extras) and rewrite the files."""
        self.rows.append(row)
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.rows)
        atomic_write_text(self.run_dir / "metrics.jsonl", text)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        csv_text = buf.getvalue()
        atomic_write_text(self.run_dir / "metrics.csv", csv_text)
        if self.writer is not None:
            step = int(row["epoch"])
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
