"""The hooks every task's run is made of: progress bar, JSON-lines log, checkpoints, periodic evaluation.

Each runs on every rank (so collectives inside them are matched) and writes files on rank 0 only."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..checkpoint import save_training_checkpoint
from ..io import remove_stale_temporaries
from .loop import Hook, Trainer
from .state import get_rng_state

_logger = logging.getLogger(__name__)


class ProgressHook(Hook):
    """A tqdm bar on rank 0: per epoch (``per_epoch``, total = steps of the epoch) or over the whole run."""

    def __init__(self, enabled: bool = True, desc: str = "train", per_epoch: bool = False,
                 epoch_steps: Optional[int] = None) -> None:
        self.enabled, self.desc, self.per_epoch, self.epoch_steps = enabled, desc, per_epoch, epoch_steps
        self.bar = None

    def _open(self, trainer: Trainer, total: Optional[int], initial: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0,
                        leave=not self.per_epoch, disable=not (self.enabled and trainer.runtime.is_main))

    def before_train(self, trainer: Trainer) -> None:
        if not self.per_epoch:
            self._open(trainer, trainer.max_iters, trainer.state.iteration, self.desc)

    def before_epoch(self, trainer: Trainer) -> None:
        if self.per_epoch:
            self._open(trainer, self.epoch_steps, 0, f"epoch {trainer.state.epoch + 1}/{trainer.max_epochs}")

    def after_step(self, trainer: Trainer) -> None:
        if self.bar is None or self.bar.disable:
            return
        self.bar.set_postfix(loss=f"{trainer.last['loss']:.4f}", lr=f"{trainer.lr():.2e}",
                             img_s=f"{trainer.epoch_progress()['samples_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def after_epoch(self, trainer: Trainer) -> None:
        if self.per_epoch and self.bar is not None:
            self.bar.close()

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


def append_jsonl(path: os.PathLike, row: Dict[str, Any]) -> None:
    """Append one JSON line with a single write (O_APPEND): a killed run leaves whole lines."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


class JsonlLogHook(Hook):
    """Every ``every`` iterations (and at the last one), rank 0 appends to ``path`` the losses averaged over the
    iterations since the previous line (as mmcv's text logger), the lr, the elapsed time and the unreadable
    samples skipped so far (this rank)."""

    def __init__(self, path: os.PathLike, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"--log-interval must be >= 1, got {every}")
        self.path, self.every = Path(path), every
        self.window: Dict[str, float] = {}
        self.n = 0
        self.t0 = time.time()

    def before_train(self, trainer: Trainer) -> None:
        self.t0 = time.time()

    def after_step(self, trainer: Trainer) -> None:
        for k, v in trainer.last.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.n += 1
        it = trainer.state.iteration
        if it % self.every == 0 or it == trainer.max_iters:
            if trainer.runtime.is_main:
                append_jsonl(self.path, {"iter": it, "epoch": trainer.state.epoch, "lr": trainer.lr(),
                                         "time": round(time.time() - self.t0, 2),
                                         "skipped_samples": trainer.skipped_total,
                                         **{k: v / self.n for k, v in self.window.items()}})
            self.window, self.n = {}, 0


class CheckpointHook(Hook):
    """The full train state to ``path`` (RNG states of all ranks gathered; written by rank 0, atomically) every
    ``every_iters`` iterations and/or every ``every_epochs`` epochs, and at the end of the run.

    ``snapshot``: a file name pattern (``"iter_{iteration}.pth"``) for weights-only copies kept at each periodic
    save; ``best_path`` + ``is_best(trainer)``: also a copy there when the task says the epoch was its best."""

    def __init__(self, path: os.PathLike, every_iters: int = 0, every_epochs: int = 0, snapshot: Optional[str] = None,
                 best_path: Optional[os.PathLike] = None,
                 is_best: Optional[Callable[[Trainer], bool]] = None) -> None:
        self.path, self.every_iters, self.every_epochs = Path(path), every_iters, every_epochs
        self.snapshot, self.best_path, self.is_best = snapshot, best_path, is_best
        self._saved_at = -1

    def save(self, trainer: Trainer, periodic: bool = False) -> None:
        st = trainer.state
        rng = trainer.runtime.all_gather_object(get_rng_state())  # a collective: every rank
        if trainer.runtime.is_main:
            # the snapshot and best copy first: once the resumable file says N, the files of N exist too
            if periodic and self.snapshot:
                save_training_checkpoint(st.state_dict(weights_only=True),
                                         self.path.parent / self.snapshot.format(iteration=st.iteration))
            ckpt = st.state_dict(rng=rng)
            if self.best_path is not None and self.is_best is not None and self.is_best(trainer):
                save_training_checkpoint(ckpt, self.best_path)
            save_training_checkpoint(ckpt, self.path)
        self._saved_at = st.iteration

    def before_train(self, trainer: Trainer) -> None:
        # a run killed while writing leaves its temporary files (elsa.io.atomic_write names them .NAME.XXXX.tmp)
        if trainer.runtime.is_main:
            removed = remove_stale_temporaries(self.path.parent)
            if removed:
                _logger.info("removed %d temporary file(s) left by an interrupted write in %s (%.1f MB): %s",
                             len(removed), self.path.parent, sum(n for _, n in removed) / 1e6,
                             ", ".join(p.name for p, _ in removed))

    def after_step(self, trainer: Trainer) -> None:
        if self.every_iters and trainer.state.iteration % self.every_iters == 0:
            self.save(trainer, periodic=True)

    def after_epoch(self, trainer: Trainer) -> None:
        if self.every_epochs and trainer.state.epoch % self.every_epochs == 0:
            self.save(trainer, periodic=not self.every_iters)

    def after_train(self, trainer: Trainer) -> None:
        if self._saved_at != trainer.state.iteration:
            self.save(trainer)


class EvalHook(Hook):
    """``evaluate(trainer)`` every ``every_iters`` iterations and/or ``every_epochs`` epochs, and once at the end
    (``at_end``) unless it just ran at that iteration. The result is kept in ``self.result``."""

    def __init__(self, evaluate: Callable[[Trainer], Any], every_iters: int = 0, every_epochs: int = 0,
                 at_end: bool = True) -> None:
        self.evaluate, self.every_iters, self.every_epochs, self.at_end = evaluate, every_iters, every_epochs, at_end
        self.result: Any = None
        self._ran_at = -1

    def _run(self, trainer: Trainer) -> None:
        self.result = self.evaluate(trainer)
        self._ran_at = trainer.state.iteration
        trainer.model.train()

    def after_step(self, trainer: Trainer) -> None:
        if self.every_iters and trainer.state.iteration % self.every_iters == 0:
            self._run(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        if self.every_epochs and trainer.state.epoch % self.every_epochs == 0:
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.at_end and self._ran_at != trainer.state.iteration:
            self._run(trainer)
