"""Segmentation on the shared engine (``elsa seg``): the optimizer and poly schedule, the step, mIoU evaluation and
checkpoint reading for ADE20K UPerNet. The iteration-based loop, fp16 autocast on CUDA, DDP (SyncBatchNorm heads on
GPUs, sharded data, all-reduced histograms), resume and atomic checkpoints are ``elsa.engine``'s; only rank 0 logs
and writes files.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...checkpoint import CheckpointError, fit_state_dict, load_training_checkpoint, read_checkpoint, unwrap_state_dict
from ...engine import (CheckpointHook, EvalHook, JsonlLogHook, ProgressHook, Runtime, StepOutput, Trainer, TrainState,
                       init_runtime, seed_worker, unwrap_model)
from ...data.folder import SAMPLE_ERRORS, SkipUnreadable
from ...engine.optim import linear_warmup, param_groups
from ...io import atomic_write_text
from ..checks import check_resume_fits
from .ade20k_meta import ADE20K_CLASSES
from .data import ADE20KDataset, TrainTransform, collate_skip
from .metrics import SegEvaluator
from .recipes import SegRecipe
from .segmentor import EncoderDecoder, build_segmentor, inference_settings, predict_probs

_logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ optimisation
def poly_warmup_factor(recipe: SegRecipe) -> Callable[[int], float]:
    """lr(it) / base_lr for mmcv's poly policy with linear warm-up (by iteration):
    poly: (1 - it/iters)^power * (1 - min_lr/base) + min_lr/base, times the warm-up multiplier while
    it < warmup_iters."""
    floor = recipe.min_lr / recipe.lr if recipe.lr > 0 else 0.0

    def factor(it: int) -> float:
        progress = min(it, recipe.iters) / recipe.iters
        regular = (1 - floor) * (1 - progress) ** recipe.poly_power + floor
        return regular * linear_warmup(it, recipe.warmup_iters, recipe.warmup_ratio)

    return factor


def build_optimizer(model: nn.Module, recipe: SegRecipe):
    """AdamW (official lr, betas, weight decay and no-decay keys) and the per-iteration LambdaLR."""
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay, recipe.no_decay_keys), lr=recipe.lr, betas=recipe.betas,
                            weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_warmup_factor(recipe))
    return opt, sched


# ------------------------------------------------------------------------------------------------------- checkpoints
def load_segmentor(path, recipe: Optional[SegRecipe] = None) -> Tuple[EncoderDecoder, SegRecipe]:
    """Model for inference from one of our checkpoints (recipe inside) or an official mmseg checkpoint
    (``state_dict`` with backbone./decode_head./auxiliary_head. keys; needs ``recipe``). The file is read once."""
    ckpt = read_checkpoint(path, "--checkpoint file")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("recipe"), dict):
        stored = SegRecipe.from_dict(ckpt["recipe"])
        if recipe is not None and recipe.name != stored.name:
            _logger.warning("checkpoint was trained with recipe %s; using its stored settings, not %s",
                            stored.name, recipe.name)
        recipe = stored
    if recipe is None:
        raise CheckpointError(f"{path} holds no recipe; pass --recipe")
    model = build_segmentor(recipe)
    state = unwrap_state_dict(ckpt)
    state = {k: v for k, v in state.items() if not k.endswith("attn_mask")}
    report = fit_state_dict(model, state, strict=False, ignore=("num_batches_tracked",))
    if report.missing:
        raise CheckpointError(f"{path} does not fit {recipe.name}: {len(report.missing)} missing tensors "
                              f"(e.g. {report.missing[:3]})")
    if report.unexpected:
        _logger.warning("ignored %d tensors from %s (e.g. %s)", len(report.unexpected), path, report.unexpected[:3])
    return model, recipe


# ----------------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, dataset: ADE20KDataset, recipe: SegRecipe, mode: str = "whole",
             device: Optional[torch.device] = None, runtime: Optional[Runtime] = None, progress: bool = False,
             class_names=None) -> Dict[str, object]:
    """mIoU/aAcc/mAcc and per-class IoU over ``dataset`` (evaluation items, one image at a time as mmseg does).
    ``mode``: whole, slide or ms-flip. Unreadable samples are skipped and counted in ``skipped``."""
    info = runtime or Runtime()
    device = device or next(model.parameters()).device
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    settings = inference_settings(mode, recipe.ms_ratios)
    names = class_names if class_names is not None else (
        ADE20K_CLASSES if recipe.num_classes == len(ADE20K_CLASSES) else None)
    evaluator = SegEvaluator(recipe.num_classes, class_names=names)
    indices = list(range(info.rank, len(dataset), info.world_size))
    skipped = 0
    first_error = ""
    iterator = indices
    if progress and info.is_main:
        from tqdm import tqdm
        iterator = tqdm(indices, desc=f"eval ({mode})", unit="img", dynamic_ncols=True)
    t0 = time.time()
    for i in iterator:
        try:
            item = dataset[i]
        except SAMPLE_ERRORS as exc:  # PIL raises these on truncated/corrupt files
            _logger.warning("left out of the evaluation: %s: %s", dataset.filename(i), exc)
            skipped += 1
            first_error = first_error or f"{dataset.filename(i)}: {exc}"
            continue
        img = item["img"][None].to(device)
        probs = predict_probs(net, img, img_scale=recipe.img_scale, crop_size=recipe.slide_crop,
                              stride=recipe.slide_stride, **settings)
        evaluator.update(probs.argmax(1)[0].cpu(), item["label"])
    if info.distributed:
        evaluator.merge_(info.all_reduce_tensor(evaluator.areas()))
        skipped, num_images = info.all_reduce_sum([skipped, evaluator.num_images])
        skipped, evaluator.num_images = int(skipped), int(num_images)
    net.train(was_training)
    result = evaluator.summary()
    if dataset.skipped and not first_error:
        first_error = f"{dataset.skipped[0].path}: {dataset.skipped[0].reason}"
    result.update(mode=mode, skipped=skipped + len(dataset.skipped), first_skipped=first_error,
                  labelled_pixels=float(evaluator.area_label.sum()), seconds=time.time() - t0)
    return result


def format_table(result: Dict[str, object]) -> str:
    """Per-class IoU/Acc table and the summary line (percent), for the CLI."""
    lines = [f"{'class':<24}{'IoU':>8}{'Acc':>8}"]
    for name, iou, acc in zip(result["classes"], result["IoU"], result["Acc"]):  # type: ignore[arg-type]
        lines.append(f"{name:<24}{100 * iou:>8.2f}{100 * acc:>8.2f}")
    lines.append(f"mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  aAcc {100 * result['aAcc']:.2f}"
                 f"  ({result['num_images']} images, {result['skipped']} skipped, mode {result['mode']})")
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and x != x:
        return None  # NaN (class absent from GT and prediction) -> null, keeping the file strict JSON
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: Path, obj: dict) -> None:
    """Atomic, strict JSON (NaN written as null)."""
    text = json.dumps(_json_safe(obj), indent=2, allow_nan=False)
    atomic_write_text(path, text)


# -------------------------------------------------------------------------------------------------------------- train
# A folder holding any of these holds a run that a new `elsa seg train` must not overwrite.
RUN_FILES = ("latest.pth", "eval_latest.json", "log.jsonl")


def train(recipe: SegRecipe, data_root, output: Path, pretrained: Optional[str] = None, resume: bool = False,
          workers: int = 4, seed: int = 0, progress: bool = True, eval_mode: Optional[str] = None,
          device: Optional[str] = None, grad_checkpointing: bool = False) -> Dict[str, object]:
    """Train ``recipe`` on ADE20K at ``data_root``; checkpoints/logs in ``output``. Returns the last evaluation (if
    any) with ``skipped_train_samples`` and this process's ``rank``. ``resume`` continues from ``output/latest.pth`` (model, optimizer, scheduler, scaler,
    iteration, RNG states). ``device`` (e.g. "cpu", "cuda") defaults to the rank's GPU, else the CPU."""
    runtime = init_runtime(device, amp=recipe.amp, amp_dtype_name=recipe.amp_dtype,
                           amp_on_cpu=recipe.amp_dtype == "bfloat16")
    device = runtime.device
    output = Path(output)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + runtime.rank)

    train_set = ADE20KDataset(data_root, "training", TrainTransform(
        recipe.img_scale, recipe.ratio_range, recipe.crop_size, recipe.cat_max_ratio, recipe.flip_prob,
        seed=seed + 1000 * runtime.rank), num_classes=recipe.num_classes)
    try:
        val_set: Optional[ADE20KDataset] = ADE20KDataset(data_root, "validation", num_classes=recipe.num_classes)
    except FileNotFoundError as exc:
        _logger.warning("no validation split, training without evaluation: %s", exc)
        val_set = None

    model = build_segmentor(recipe)
    if pretrained:
        model.backbone.load_pretrained(pretrained)
    if grad_checkpointing:  # trades backbone recomputation for activation memory
        model.backbone.set_grad_checkpointing(True)
    net = runtime.wrap(model, sync_bn=True)
    optimizer, scheduler = build_optimizer(model, recipe)
    state = TrainState(model, optimizer, scheduler, runtime.grad_scaler(), extra={"recipe": recipe.to_dict()})
    latest = output / "latest.pth"
    if resume:
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {latest}")
        ckpt = load_training_checkpoint(latest, command="elsa seg train", required=("model", "optimizer", "iteration"))
        check_resume_fits(ckpt, model, latest, recipe.name)
        state.load_state_dict(ckpt, runtime)
        if runtime.is_main:
            _logger.info("resumed from %s at iteration %d", latest, state.iteration)

    # DistributedSampler for one process too: the order depends on (seed, epoch) only, so a resumed run
    # continues the same sequence of epochs
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=runtime.world_size, rank=runtime.rank,
                                                  shuffle=True, seed=seed)
    loader = DataLoader(SkipUnreadable(train_set), batch_size=recipe.batch_per_gpu, sampler=sampler, num_workers=workers,
                        collate_fn=collate_skip, drop_last=len(train_set) >= recipe.batch_per_gpu * runtime.world_size,
                        pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                        persistent_workers=workers > 0)
    if runtime.is_main:
        _logger.info("training %s: %d images (%d skipped), batch %d x %d processes, %d iterations from %d",
                     recipe.name, len(train_set), len(train_set.skipped), recipe.batch_per_gpu, runtime.world_size,
                     recipe.iters, state.iteration)

    def step(m: nn.Module, batch) -> StepOutput:
        skipped = int(batch["skipped"])
        if "img" not in batch:
            return StepOutput(None, 0, skipped)  # every sample of this batch was unreadable
        img = batch["img"].to(device, non_blocking=True)
        losses = m(img, batch["label"].to(device, non_blocking=True))
        return StepOutput(losses, img.shape[0], skipped)

    def run_eval(trainer: Trainer) -> Dict[str, object]:
        result = evaluate(net, val_set, recipe, mode=eval_mode or recipe.test_mode, device=device, runtime=runtime,
                          progress=progress)
        result["iter"] = trainer.state.iteration
        if runtime.is_main:
            _logger.info("iter %d: mIoU %.2f aAcc %.2f mAcc %.2f", result["iter"], 100 * result["mIoU"],
                         100 * result["aAcc"], 100 * result["mAcc"])
            write_json(output / "eval_latest.json", result)
        return result

    hooks = [ProgressHook(progress, desc="train"), JsonlLogHook(output / "log.jsonl", recipe.log_interval),
             CheckpointHook(latest, every_iters=recipe.ckpt_interval, snapshot="iter_{iteration}.pth")]
    evaluation = EvalHook(run_eval, every_iters=recipe.eval_interval) if val_set is not None else None
    if evaluation is not None:
        hooks.append(evaluation)
    trainer = Trainer(runtime, state, net, loader, step, max_iters=recipe.iters, hooks=hooks).fit()
    if trainer.skipped_total and runtime.is_main:
        _logger.warning("skipped %d unreadable training samples", trainer.skipped_total)
    last_eval: Dict[str, object] = dict(evaluation.result or {}) if evaluation is not None else {}
    last_eval["skipped_train_samples"] = trainer.skipped_total + len(train_set.skipped)
    last_eval["rank"] = runtime.rank
    runtime.barrier()
    return last_eval


# ------------------------------------------------------------------------------------------------------------ predict
@torch.no_grad()
def predict_image(model: nn.Module, recipe: SegRecipe, image_path, mode: str = "whole",
                  device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image (H, W, 3), predicted class map (H, W) int64) for one image file."""
    from .data import load_pair, normalize

    device = device or next(model.parameters()).device
    rgb, _ = load_pair(Path(image_path), None)
    model.eval()
    probs = predict_probs(model, normalize(rgb)[None].to(device), img_scale=recipe.img_scale,
                          crop_size=recipe.slide_crop, stride=recipe.slide_stride,
                          **inference_settings(mode, recipe.ms_ratios))
    return rgb, probs.argmax(1)[0].cpu().numpy()
