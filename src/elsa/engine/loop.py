"""The one training loop (``Trainer.fit``) behind ``elsa train``, ``elsa det train`` and ``elsa seg train``.

Division of work, after detectron2's ``SimpleTrainer`` + hooks and timm's ``train.py``: a task supplies the model,
the data loader and a ``step`` (batch -> losses, run under the run's autocast); the trainer owns everything that
must be the same for all tasks: the optimizer step with loss scaling and gradient clipping, the non-finite-loss
check, EMA, the learning-rate schedule (timm schedulers by update and by epoch, torch schedulers per iteration),
epoch/iteration counting (epoch- or iteration-based by ``max_epochs`` / ``max_iters``), per-epoch statistics
reduced over ranks, and the hook calls. Progress, logging, checkpoints and evaluation are hooks (``hooks.py``).

Why not Lightning Fabric or Accelerate: they would own the same few lines (device placement, autocast, DDP), but
not resume with RNG states, timm's schedulers and EMA, or the rank-0 file layout the tests and README rely on; the
loop here is ~150 lines and one more dependency would not remove any of them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .runtime import Runtime, unwrap_model
from .state import TrainState

_logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What a task's step returns for one batch: ``losses`` (``"loss"`` is back-propagated; every entry is
    logged), the number of samples trained on, and of unreadable samples skipped. ``losses=None``: nothing to
    train on in this batch (all its samples were unreadable); no optimizer step is taken."""
    losses: Optional[Dict[str, torch.Tensor]]
    batch_size: int = 0
    skipped: int = 0


StepFn = Callable[[nn.Module, Any], StepOutput]


class Hook:
    """Called by ``Trainer.fit`` on every rank; override what you need. Collectives are allowed (every rank runs
    the same hooks at the same points); files are written by rank 0 only (``trainer.runtime.is_main``)."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def before_epoch(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_epoch(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during ``Trainer.fit``: where the run stood and the checkpoint that resumes it (None when
    none was written yet), so the command can print one line with the ``--resume`` command instead of a
    traceback."""

    def __init__(self, checkpoint: Optional[Path], epoch: int, iteration: int) -> None:
        self.checkpoint, self.epoch, self.iteration = checkpoint, epoch, iteration
        where = f"interrupted in epoch {epoch + 1} (iteration {iteration})"
        super().__init__(f"{where}; continue with --resume {checkpoint}" if checkpoint is not None
                         else f"{where}, before any checkpoint was written: nothing to resume")


@dataclass
class EpochStats:
    """Sums over this rank's steps of the running epoch (reduced over ranks by ``Trainer`` at its end)."""
    losses: Dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    skipped: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Runs ``step`` over ``loader`` until ``max_iters`` optimizer steps or ``max_epochs`` epochs (the schedule's
    length; ``stop_epoch`` ends this invocation earlier, to be resumed), at most ``steps_per_epoch`` steps each.

    ``model`` is what the step calls (DDP-wrapped under torchrun); ``state.model`` the bare model that is saved."""

    def __init__(self, runtime: Runtime, state: TrainState, model: nn.Module, loader: Iterable, step: StepFn, *,
                 max_epochs: Optional[int] = None, max_iters: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None, stop_epoch: Optional[int] = None,
                 clip_grad: Optional[float] = None, clip_mode: str = "norm", hooks: Iterable[Hook] = ()) -> None:
        if max_epochs is None and max_iters is None:
            raise ValueError("Trainer needs max_epochs or max_iters")
        self.runtime, self.state, self.model, self.loader, self.step = runtime, state, model, loader, step
        self.max_epochs, self.max_iters = max_epochs, max_iters
        self.steps_per_epoch = steps_per_epoch
        self.stop_epoch = stop_epoch if stop_epoch is not None else max_epochs
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.hooks: List[Hook] = list(hooks)
        self.last: Dict[str, float] = {}          # the last step's losses (floats), for hooks
        self.last_batch_size = 0
        self.skipped_total = 0                    # unreadable samples met by this rank in this invocation
        self.epoch_stats: Dict[str, float] = {}   # the last finished epoch, reduced over ranks
        self._epoch = EpochStats()

    # ------------------------------------------------------------------------------------------------------ queries
    @property
    def timm_scheduler(self) -> bool:
        return hasattr(self.state.scheduler, "step_update")

    def done(self) -> bool:
        if self.max_iters is not None and self.state.iteration >= self.max_iters:
            return True
        return self.stop_epoch is not None and self.state.epoch >= self.stop_epoch

    def lr(self) -> float:
        return float(self.state.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------------------------------- loop
    def fit(self) -> "Trainer":
        """Train to the end of the schedule (or ``stop_epoch``); returns self (counters in ``self.state``)."""
        if self.timm_scheduler:
            self.state.scheduler.step(self.state.epoch)
        if self.runtime.is_main:
            dtype = self.runtime.amp_dtype
            _logger.info("training on %s x %d: autocast %s, grad scaler %s; from epoch %d, iteration %d",
                         self.runtime.device, self.runtime.world_size, str(dtype).replace("torch.", "") if dtype
                         else "off", "on" if self.state.scaler is not None else "off", self.state.epoch,
                         self.state.iteration)
        self._call("before_train")
        try:
            self._loop()
        except KeyboardInterrupt as err:
            if isinstance(err, Interrupted):
                raise
            raise Interrupted(self._checkpoint_path(), self.state.epoch, self.state.iteration) from None
        self._call("after_train")
        return self

    def _checkpoint_path(self) -> Optional[Path]:
        """The resumable checkpoint a CheckpointHook of this run has written, if any."""
        from .hooks import CheckpointHook  # hooks import this module

        for hook in self.hooks:
            if isinstance(hook, CheckpointHook) and hook.path.is_file():
                return hook.path
        return None

    def _loop(self) -> None:
        while not self.done():
            self._set_epoch(self.state.epoch)
            self._epoch = EpochStats()
            self.model.train()
            self._call("before_epoch")
            for batch in self.loader:
                self.run_step(batch)
                if self.done() or (self.steps_per_epoch and self._epoch.steps >= self.steps_per_epoch):
                    break
            if self._epoch.steps == 0 and not self._epoch.skipped:
                raise ValueError("the training data loader gave no batch in a whole epoch (fewer samples than one "
                                 "batch per process?)")
            self._end_epoch()

    def run_step(self, batch: Any) -> None:
        """Forward (task step, under autocast), non-finite check, backward with loss scaling, clipping, optimizer
        step, EMA and schedule updates, then the ``after_step`` hooks."""
        st = self.state
        with self.runtime.autocast():
            out = self.step(self.model, batch)
        self._epoch.skipped += out.skipped
        self.skipped_total += out.skipped
        if out.losses is None:
            return
        loss = out.losses["loss"]
        value = float(loss.detach())
        if not math.isfinite(value):
            parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.losses.items() if k != "loss")
            raise FloatingPointError(f"loss is {value} at epoch {st.epoch + 1}, iteration {st.iteration}"
                                     + (f" ({parts})" if parts else "") + "; lower the learning rate or clip "
                                     "gradients")
        st.optimizer.zero_grad(set_to_none=True)
        if st.scaler is not None:
            st.scaler.scale(loss).backward()
            if self.clip_grad:
                st.scaler.unscale_(st.optimizer)
                self._clip()
            st.scaler.step(st.optimizer)
            st.scaler.update()
        else:
            loss.backward()
            if self.clip_grad:
                self._clip()
            st.optimizer.step()
        st.iteration += 1
        if st.ema is not None:
            st.ema.update(unwrap_model(self.model), step=st.iteration)
        if st.scheduler is not None:
            if self.timm_scheduler:
                st.scheduler.step_update(num_updates=st.iteration)
            else:
                st.scheduler.step()
        self.last = {k: float(v.detach()) for k, v in out.losses.items()}
        self.last_batch_size = out.batch_size
        for k, v in self.last.items():
            self._epoch.losses[k] = self._epoch.losses.get(k, 0.0) + v
        self._epoch.steps += 1
        self._epoch.samples += out.batch_size
        self._call("after_step")

    def epoch_progress(self) -> Dict[str, float]:
        """This rank's running numbers of the epoch (for progress bars): steps, samples/s over all ranks."""
        elapsed = max(time.perf_counter() - self._epoch.start, 1e-9)
        return {"steps": self._epoch.steps, "samples_per_s": self._epoch.samples * self.runtime.world_size / elapsed}

    # ---------------------------------------------------------------------------------------------------- helpers
    def _clip(self) -> None:
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode=self.clip_mode)

    def _set_epoch(self, epoch: int) -> None:
        for sampler in (getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def _end_epoch(self) -> None:
        e = self._epoch
        keys = sorted(e.losses)
        elapsed = time.perf_counter() - e.start
        sums = self.runtime.all_reduce_sum([e.losses[k] for k in keys] + [e.steps, e.samples, e.skipped])
        steps = max(sums[len(keys)], 1)
        self.state.epoch += 1
        if self.timm_scheduler:
            self.state.scheduler.step(self.state.epoch)
        self.epoch_stats = {k: s / steps for k, s in zip(keys, sums)}
        self.epoch_stats.update(steps=sums[len(keys)], samples=sums[len(keys) + 1], skipped=sums[len(keys) + 2],
                                lr=self.lr(), seconds=elapsed,
                                samples_per_s=sums[len(keys) + 1] / max(elapsed, 1e-9))
        self._call("after_epoch")

    def _call(self, name: str) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self)
