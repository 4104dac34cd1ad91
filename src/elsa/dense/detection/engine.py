"""Training and evaluation loops for ``elsa det``: AdamW with mmcv's paramwise rule, step schedule with linear
warm-up (per iteration, as mmcv's LrUpdaterHook), fp16 autocast with loss scaling on CUDA, DDP under torchrun
(batches grouped by aspect ratio and sharded per rank), atomic checkpoints with resume, COCO evaluation."""
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

from ...distributed import init_distributed
from ...io import atomic_write_text, torch_save
from ..recipes_det import DetRecipe
from .data import AspectRatioBatchSampler, CocoInstances, collate
from .evaluation import CocoEvaluator, load_coco

_logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ optimisation
def param_groups(model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str]) -> List[Dict[str, Any]]:
    """Two AdamW groups as mmcv's DefaultOptimizerConstructor with ``custom_keys={k: decay_mult 0}``: a
    parameter whose full name contains any of ``no_decay_keys`` gets no weight decay; all others (biases too)
    get ``weight_decay``. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in no_decay_keys) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: DetRecipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, recipe.weight_decay, recipe.no_decay_keys), lr=recipe.lr,
                             betas=tuple(recipe.betas))


def lr_factor(it: int, step_iters: Sequence[int], warmup_iters: int, warmup_ratio: float, gamma: float) -> float:
    """mmcv step policy with linear warm-up: gamma ** (#steps passed) times, during the first ``warmup_iters``
    iterations, 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)."""
    f = gamma ** sum(it >= s for s in step_iters)
    if it < warmup_iters:
        f *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return f


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


# ------------------------------------------------------------------------------------------------ loops
def _to(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def checkpoint_state(model, optimizer, scheduler, scaler, epoch: int, iteration: int, recipe: DetRecipe,
                     meta: Dict[str, Any]) -> Dict[str, Any]:
    return {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "iteration": iteration, "recipe": recipe.to_dict(), "meta": meta}


def train(model: nn.Module, recipe: DetRecipe, train_set: CocoInstances, output: Path,
          val_set: Optional[CocoInstances] = None, resume: bool = False, eval_interval: int = 0,
          device: Optional[torch.device] = None, progress: bool = True, log_interval: int = 50) -> Dict[str, Any]:
    """Train ``model`` per ``recipe`` and return a summary (final losses, metrics if ``val_set``).

    Writes ``output/last.pth`` after every epoch and at the end (atomically; ``resume=True`` continues from it:
    model, optimizer, scheduler, scaler, epoch, iteration), ``output/log.jsonl`` and ``output/metrics.json``.
    """
    from tqdm import tqdm

    info = init_distributed()
    rank, world = info.rank, info.world_size
    device = device or info.device
    output = Path(output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    if world * recipe.batch_size != 16 and rank == 0:
        _logger.info("total batch %d (official: 16 = 2 x 8 GPUs); lr %.2g is used as is, not rescaled",
                     world * recipe.batch_size, recipe.lr)
    model.to(device)
    if world > 1:
        if device.type == "cuda":  # the official cascade heads use SyncBN (CUDA only in PyTorch)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = AspectRatioBatchSampler(train_set, recipe.batch_size, rank=rank, world_size=world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=recipe.workers, collate_fn=collate,
                        persistent_workers=recipe.workers > 0)
    total, steps = schedule(recipe, len(loader))
    optimizer = build_optimizer(_unwrap(model), recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, steps, recipe.warmup_iters, recipe.warmup_ratio, recipe.lr_gamma))
    use_amp = recipe.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    meta = {"classes": train_set.classes, "cat_ids": train_set.cat_ids}
    epoch, iteration = 0, 0
    ckpt_path = output / "last.pth"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, iteration = int(state["epoch"]), int(state["iteration"])
        _logger.info("resumed from %s at epoch %d, iteration %d", ckpt_path, epoch, iteration)
    log_file = output / "log.jsonl"
    last: Dict[str, float] = {}
    window: Dict[str, float] = {}
    window_n = 0
    metrics: Dict[str, Any] = {}
    bar = tqdm(total=total, initial=iteration, disable=not progress or rank != 0, desc="det train", dynamic_ncols=True)
    t0 = time.time()
    while iteration < total:
        model.train()
        sampler.set_epoch(epoch)
        for images, targets in loader:
            if iteration >= total:
                break
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _to(targets, device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            iteration += 1
            last = {k: float(v.detach()) for k, v in losses.items()}
            last["loss"] = float(loss.detach())
            for k, v in last.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if rank == 0 and (iteration % log_interval == 0 or iteration == total):
                # losses averaged over the iterations since the previous line (as mmcv's text logger)
                with open(log_file, "a") as f:
                    f.write(json.dumps({"iter": iteration, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                        "time": round(time.time() - t0, 2),
                                        **{k: v / window_n for k, v in window.items()}}) + "\n")
                window, window_n = {}, 0
        epoch += 1
        if rank == 0:
            torch_save(checkpoint_state(model, optimizer, scheduler, scaler, epoch, iteration, recipe, meta),
                       ckpt_path)
        if val_set is not None and eval_interval and epoch % eval_interval == 0 and iteration < total:
            metrics = evaluate(_unwrap(model), val_set, recipe, device=device, progress=progress)
    bar.close()
    if val_set is not None:
        metrics = evaluate(_unwrap(model), val_set, recipe, device=device, progress=progress)
        if rank == 0:
            _write_json(output / "metrics.json", metrics)
    return {"iterations": iteration, "epochs": epoch, "last_losses": last, "metrics": metrics,
            "checkpoint": str(ckpt_path), "seconds": time.time() - t0, "rank": rank}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: CocoInstances, device: torch.device, batch_size: int = 1,
                    progress: bool = True) -> CocoEvaluator:
    """Run ``model`` over ``dataset`` (its shard under DDP) and return the filled (gathered) CocoEvaluator."""
    from tqdm import tqdm

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    indices = list(range(rank, len(dataset), world))
    subset = torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    evaluator = CocoEvaluator(load_coco(str(dataset.ann_file)), dataset.cat_ids)
    model.eval()
    for images, targets in tqdm(loader, disable=not progress or rank != 0, desc="det eval", dynamic_ncols=True):
        preds = model([im.to(device) for im in images])
        evaluator.update([int(t["image_id"]) for t in targets], [{k: v.cpu() for k, v in p.items()} for p in preds])
    evaluator.gather()
    return evaluator


def evaluate(model: nn.Module, dataset: CocoInstances, recipe: DetRecipe, device: Optional[torch.device] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Box and mask COCO metrics of ``model`` on ``dataset`` ({"bbox": {...}, "segm": {...}})."""
    device = device or next(model.parameters()).device
    evaluator = predict_dataset(model, dataset, device, progress=progress)
    return evaluator.summarize()


def read_detector_checkpoint(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict in this package's names, meta) from an ``elsa det`` checkpoint, a bare state dict, or an official
    mmdetection checkpoint (``{"state_dict", "meta": {"CLASSES"}}``, converted by ``convert.py``)."""
    from .convert import convert_mmdet_state_dict, is_mmdet_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file and the cause
        raise ValueError(f"checkpoint {path}: cannot be read with weights_only=True ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(state).__name__}")
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
    if is_mmdet_state_dict(sd):
        sd = convert_mmdet_state_dict(sd)
        meta["converted_from"] = "mmdetection"
    return sd, meta


def load_model_checkpoint(model: nn.Module, path: os.PathLike) -> Dict[str, Any]:
    """Load ``model`` weights (see ``read_detector_checkpoint``) and return the checkpoint's meta. Every parameter
    must be in the file (buffers such as the window stage's index table may be absent: they are rebuilt); tensors
    the model does not have are logged, not fatal; a shape mismatch raises."""
    sd, meta = read_detector_checkpoint(path)
    result = model.load_state_dict(sd, strict=False)
    params = {k for k, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the model: {len(missing)} parameters missing "
                         f"(e.g. {missing[:5]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:5]}); check --recipe")
    if result.unexpected_keys:
        _logger.warning("checkpoint %s: %d tensors not used (e.g. %s)", path, len(result.unexpected_keys),
                        result.unexpected_keys[:5])
    return meta
