"""Detection on the shared engine (``elsa det``): the optimizer (AdamW with mmcv's paramwise rule), the step
schedule with linear warm-up (per iteration, as mmcv's LrUpdaterHook), the step (images, targets -> losses), COCO
evaluation and checkpoint reading. The loop, fp16 autocast with loss scaling on CUDA, DDP, resume and atomic
checkpoints are ``elsa.engine``'s; batches are grouped by aspect ratio and sharded per rank."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...checkpoint import CheckpointError, fit_state_dict, load_training_checkpoint, read_checkpoint
from ...engine import (CheckpointHook, EvalHook, JsonlLogHook, ProgressHook, Runtime, StepOutput, Trainer, TrainState,
                       init_runtime, seed_worker, unwrap_model)
from ...engine.optim import linear_warmup, param_groups
from ...io import atomic_write_text
from ..checks import check_resume_fits
from ..recipes_det import DetRecipe
from ...data.folder import SkipUnreadable
from .data import AspectRatioBatchSampler, CocoInstances, ImagesOrNone, collate, collate_skip
from .evaluation import CocoEvaluator

_logger = logging.getLogger(__name__)

__all__ = ["param_groups", "build_optimizer", "lr_factor", "schedule", "train", "evaluate", "predict_dataset",
           "read_detector_checkpoint", "load_model_checkpoint"]


# ------------------------------------------------------------------------------------------------ optimisation
def build_optimizer(model: nn.Module, recipe: DetRecipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, recipe.weight_decay, recipe.no_decay_keys), lr=recipe.lr,
                             betas=tuple(recipe.betas))


def lr_factor(it: int, step_iters: Sequence[int], warmup_iters: int, warmup_ratio: float, gamma: float) -> float:
    """mmcv step policy with linear warm-up: gamma ** (#steps passed) times the warm-up multiplier."""
    return gamma ** sum(it >= s for s in step_iters) * linear_warmup(it, warmup_iters, warmup_ratio)


def schedule(recipe: DetRecipe, iters_per_epoch: int) -> Tuple[int, List[int]]:
    """(total iterations, lr step iterations): epochs x iters_per_epoch, or ``max_iters`` with the steps at the
    same fractions of training (8/12 and 11/12 for 1x)."""
    if recipe.max_iters:
        total = int(recipe.max_iters)
        steps = [int(round(total * s / recipe.epochs)) for s in recipe.lr_steps]
    else:
        total = recipe.epochs * iters_per_epoch
        steps = [s * iters_per_epoch for s in recipe.lr_steps]
    return total, steps


# ------------------------------------------------------------------------------------------------ training
def _to(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


# A folder holding any of these holds a run that a new `elsa det train` must not overwrite.
RUN_FILES = ("last.pth", "metrics.json", "log.jsonl")


def train(model: nn.Module, recipe: DetRecipe, train_set: CocoInstances, output: Path,
          val_set: Optional[CocoInstances] = None, resume: bool = False, eval_interval: int = 0,
          device: Optional[torch.device] = None, progress: bool = True, log_interval: int = 50) -> Dict[str, Any]:
    """Train ``model`` per ``recipe`` and return a summary (final losses, metrics if ``val_set``).

    Writes ``output/last.pth`` after every epoch and at the end (atomically; ``resume=True`` continues from it:
    model, optimizer, scheduler, scaler, epoch, iteration, RNG states), ``output/log.jsonl`` and
    ``output/metrics.json`` (the latest evaluation)."""
    runtime = init_runtime(str(device) if device is not None else None, amp=recipe.amp,
                           amp_dtype_name=recipe.amp_dtype, amp_on_cpu=recipe.amp_dtype == "bfloat16")
    output = Path(output)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
        if runtime.world_size * recipe.batch_size != 16:
            _logger.info("total batch %d (official: 16 = 2 x 8 GPUs); lr %.2g is used as is, not rescaled",
                         runtime.world_size * recipe.batch_size, recipe.lr)
    net = runtime.wrap(model, sync_bn=True)  # the official cascade heads use SyncBN
    sampler = AspectRatioBatchSampler(train_set, recipe.batch_size, rank=runtime.rank, world_size=runtime.world_size)
    loader = DataLoader(SkipUnreadable(train_set), batch_sampler=sampler, num_workers=recipe.workers,
                        collate_fn=collate_skip, persistent_workers=recipe.workers > 0, worker_init_fn=seed_worker)
    total, steps = schedule(recipe, len(loader))
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, steps, recipe.warmup_iters, recipe.warmup_ratio, recipe.lr_gamma))
    state = TrainState(model, optimizer, scheduler, runtime.grad_scaler(), extra={
        "recipe": recipe.to_dict(), "meta": {"classes": train_set.classes, "cat_ids": train_set.cat_ids}})
    ckpt_path = output / "last.pth"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_training_checkpoint(ckpt_path, command="elsa det train")
        check_resume_fits(ckpt, model, ckpt_path, recipe.name)
        state.load_state_dict(ckpt, runtime)
        _logger.info("resumed from %s at epoch %d, iteration %d", ckpt_path, state.epoch, state.iteration)

    def step(m: nn.Module, batch) -> StepOutput:
        images, targets, skipped = batch
        losses = m([im.to(runtime.device, non_blocking=True) for im in images], _to(targets, runtime.device))
        return StepOutput(dict(losses, loss=sum(losses.values())), len(images), skipped)

    def run_eval(trainer: Trainer) -> Dict[str, Any]:
        metrics = evaluate(model, val_set, recipe, progress=progress, runtime=runtime)
        if runtime.is_main:
            atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    hooks = [ProgressHook(progress, desc="det train"), JsonlLogHook(output / "log.jsonl", log_interval),
             CheckpointHook(ckpt_path, every_epochs=1)]
    evaluation = EvalHook(run_eval, every_epochs=eval_interval) if val_set is not None else None
    if evaluation is not None:
        hooks.append(evaluation)
    t0 = time.time()
    trainer = Trainer(runtime, state, net, loader, step, max_iters=total, hooks=hooks).fit()
    return {"iterations": state.iteration, "epochs": state.epoch, "last_losses": trainer.last,
            "metrics": evaluation.result if evaluation is not None else {}, "checkpoint": str(ckpt_path),
            "seconds": time.time() - t0, "rank": runtime.rank}


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: CocoInstances, device: Optional[torch.device] = None,
                    batch_size: int = 1, progress: bool = True, runtime: Optional[Runtime] = None) -> CocoEvaluator:
    """Run ``model`` over ``dataset`` (this rank's shard under DDP) and return the filled (gathered)
    CocoEvaluator."""
    from tqdm import tqdm

    runtime = runtime or Runtime()
    device = device or next(model.parameters()).device
    subset = ImagesOrNone(torch.utils.data.Subset(dataset, runtime.shard(len(dataset))))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    evaluator = CocoEvaluator(dataset.coco_gt(), dataset.cat_ids)
    net = unwrap_model(model)
    net.eval()
    for images, targets in tqdm(loader, disable=not progress or not runtime.is_main, desc="det eval",
                                dynamic_ncols=True):
        if not images:
            continue  # every image of the batch was unreadable
        preds = net([im.to(device) for im in images])
        evaluator.update([int(t["image_id"]) for t in targets], [{k: v.cpu() for k, v in p.items()} for p in preds])
    if subset.unreadable:
        _logger.warning("det eval: %d unreadable image(s) left out", subset.unreadable)
    evaluator.unreadable = subset.unreadable  # this rank's count, for the CLI's exit code
    evaluator.gather()
    return evaluator


def evaluate(model: nn.Module, dataset: CocoInstances, recipe: DetRecipe, device: Optional[torch.device] = None,
             progress: bool = True, runtime: Optional[Runtime] = None) -> Dict[str, Any]:
    """Box and mask COCO metrics of ``model`` on ``dataset`` ({"bbox": {...}, "segm": {...}})."""
    return predict_dataset(model, dataset, device, progress=progress, runtime=runtime).summarize()


# ------------------------------------------------------------------------------------------------ checkpoints
def read_detector_checkpoint(path: os.PathLike, checkpoint: Optional[dict] = None
                             ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict in this package's names, meta) from an ``elsa det`` checkpoint, a bare state dict, or an official
    mmdetection checkpoint (``{"state_dict", "meta": {"CLASSES"}}``, converted by ``convert.py``). ``checkpoint``:
    the file's content when the caller has already read it (no second read)."""
    from ...checkpoint import clean_state_dict
    from .convert import convert_mmdet_state_dict, is_mmdet_state_dict

    state = read_checkpoint(path, "--checkpoint file") if checkpoint is None else checkpoint
    if not isinstance(state, dict):
        raise CheckpointError(f"--checkpoint file {str(path)!r}: expected a dict, got {type(state).__name__}")
    meta: Dict[str, Any] = {}
    if "model" in state:
        sd, meta = state["model"], dict(state.get("meta") or {})
    elif "state_dict" in state:
        sd = state["state_dict"]
        classes = (state.get("meta") or {}).get("CLASSES")
        if classes:
            meta["classes"] = list(classes)
    else:
        sd = state
    sd = clean_state_dict(sd)
    if is_mmdet_state_dict(sd):
        sd = convert_mmdet_state_dict(sd)
        meta["converted_from"] = "mmdetection"
    return sd, meta


def load_model_checkpoint(model: nn.Module, path: os.PathLike, checkpoint: Optional[dict] = None) -> Dict[str, Any]:
    """Load ``model`` weights (see ``read_detector_checkpoint``) and return the checkpoint's meta. Every parameter
    must be in the file (buffers such as the window stage's index table may be absent: they are rebuilt); tensors
    the model does not have are logged, not fatal; a shape mismatch raises."""
    sd, meta = read_detector_checkpoint(path, checkpoint)
    own = model.state_dict()
    missing = [k for k, _ in model.named_parameters() if k not in sd]
    if missing:
        unexpected = [k for k in sd if k not in own]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {len(missing)} parameters missing "
                              f"(e.g. {missing[:5]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:5]}); check --recipe")
    report = fit_state_dict(model, sd, strict=False)
    if report.unexpected:
        _logger.warning("checkpoint %s: %d tensors not used (e.g. %s)", path, len(report.unexpected),
                        report.unexpected[:5])
    return meta
