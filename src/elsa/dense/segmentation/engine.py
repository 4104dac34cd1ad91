"""Iteration-based training and evaluation for ADE20K UPerNet (single process or DDP through torchrun).

Distributed: when WORLD_SIZE > 1 the process group is initialised from the torchrun environment variables, the heads'
BatchNorms become SyncBatchNorm, the training set is sharded with DistributedSampler, evaluation is sharded and the
histograms all-reduced; only rank 0 logs, writes checkpoints and JSON.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from ...distributed import DistInfo, barrier, init_distributed
from ...io import atomic_write_text, torch_save
from ...models._checkpoint import CheckpointError, fit_state_dict, unwrap_state_dict
from .ade20k_meta import ADE20K_CLASSES
from .data import ADE20KDataset, TrainTransform, collate_skip, worker_init
from .metrics import SegEvaluator
from .recipes import SegRecipe, build_segmentor, param_groups
from .segmentor import EncoderDecoder, inference_settings, predict_probs

if TYPE_CHECKING:
    import numpy as np

_logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ optimisation
def poly_warmup_factor(recipe: SegRecipe) -> Callable[[int], float]:
    """lr(it) / base_lr for mmcv's poly policy with linear warm-up (by iteration):
    poly: (1 - it/iters)^power * (1 - min_lr/base) + min_lr/base; warm-up (it < warmup_iters): poly * (1 - k) with
    k = (1 - it/warmup_iters) * (1 - warmup_ratio)."""
    floor = recipe.min_lr / recipe.lr if recipe.lr > 0 else 0.0

    def factor(it: int) -> float:
        progress = min(it, recipe.iters) / recipe.iters
        regular = (1 - floor) * (1 - progress) ** recipe.poly_power + floor
        if it < recipe.warmup_iters:
            k = (1 - it / recipe.warmup_iters) * (1 - recipe.warmup_ratio)
            return regular * (1 - k)
        return regular

    return factor


def build_optimizer(model: nn.Module, recipe: SegRecipe):
    """AdamW (official lr, betas, weight decay and no-decay keys) and the per-iteration LambdaLR."""
    opt = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr, betas=recipe.betas,
                            weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_warmup_factor(recipe))
    return opt, sched


# ------------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: nn.Module, recipe: SegRecipe, iteration: int, optimizer=None, scheduler=None,
                    scaler=None, extra: Optional[dict] = None) -> Path:
    """Atomic checkpoint: model (+ optimizer, scheduler, scaler, iteration) and the recipe to rebuild the model."""
    ckpt = {"model": _unwrap(model).state_dict(), "recipe": recipe.to_dict(), "iteration": iteration}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if extra:
        ckpt.update(extra)
    return torch_save(ckpt, path)


def read_checkpoint(path) -> dict:
    """torch.load(weights_only=True) with a clear error for a missing file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--checkpoint: no such file {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_segmentor(path, recipe: Optional[SegRecipe] = None) -> Tuple[EncoderDecoder, SegRecipe]:
    """Model for inference from one of our checkpoints (recipe inside) or an official mmseg checkpoint
    (``state_dict`` with backbone./decode_head./auxiliary_head. keys; needs ``recipe``)."""
    ckpt = read_checkpoint(path)
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
    report = fit_state_dict(model, state, strict=False)
    own_missing = [k for k in report.missing if not k.endswith("num_batches_tracked")]
    if own_missing:
        raise CheckpointError(f"{path} does not fit {recipe.name}: {len(own_missing)} missing tensors "
                              f"(e.g. {own_missing[:3]})")
    if report.unexpected:
        _logger.warning("ignored %d tensors from %s (e.g. %s)", len(report.unexpected), path, report.unexpected[:3])
    return model, recipe


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, dataset: ADE20KDataset, recipe: SegRecipe, mode: str = "whole",
             device: Optional[torch.device] = None, info: Optional[DistInfo] = None, progress: bool = False,
             class_names=None) -> Dict[str, object]:
    """mIoU/aAcc/mAcc and per-class IoU over ``dataset`` (evaluation items, one image at a time as mmseg does).
    ``mode``: whole, slide or ms-flip. Unreadable samples are skipped and counted in ``skipped``."""
    info = info or DistInfo()
    device = device or next(model.parameters()).device
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    settings = inference_settings(mode, recipe.ms_ratios)
    names = class_names if class_names is not None else (
        ADE20K_CLASSES if recipe.num_classes == len(ADE20K_CLASSES) else None)
    evaluator = SegEvaluator(recipe.num_classes, class_names=names)
    indices = list(range(info.rank, len(dataset), info.world_size))
    skipped = 0
    iterator = indices
    if progress and info.is_main:
        from tqdm import tqdm
        iterator = tqdm(indices, desc=f"eval ({mode})", unit="img", dynamic_ncols=True)
    t0 = time.time()
    for i in iterator:
        item = dataset[i]
        if item is None:
            skipped += 1
            continue
        img = item["img"][None].to(device)
        probs = predict_probs(net, img, img_scale=recipe.img_scale, crop_size=recipe.slide_crop,
                              stride=recipe.slide_stride, **settings)
        evaluator.update(probs.argmax(1)[0].cpu(), item["label"])
    if info.distributed:
        areas = evaluator.areas().to(device)
        dist.all_reduce(areas)
        evaluator.merge_(areas.cpu())
        counts = torch.tensor([skipped, evaluator.num_images], device=device)
        dist.all_reduce(counts)
        skipped, evaluator.num_images = int(counts[0]), int(counts[1])
    net.train(was_training)
    result = evaluator.summary()
    result.update(mode=mode, skipped=skipped + len(dataset.skipped), seconds=time.time() - t0)
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
def _infinite(loader: DataLoader, start_epoch: int):
    epoch = start_epoch
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


def train(recipe: SegRecipe, data_root, output: Path, pretrained: Optional[str] = None, resume: bool = False,
          workers: int = 4, seed: int = 0, progress: bool = True, eval_mode: Optional[str] = None,
          device: Optional[str] = None, grad_checkpointing: bool = False) -> Dict[str, object]:
    """Train ``recipe`` on ADE20K at ``data_root``; checkpoints/logs in ``output``. Returns the last evaluation (or
    {} when there is none). ``resume`` continues from ``output/latest.pth`` (model, optimizer, scheduler, scaler,
    iteration). ``device`` (e.g. "cpu", "cuda") defaults to the rank's GPU, else the CPU."""
    info = init_distributed(device)
    device = info.device
    output = Path(output)
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + info.rank)

    train_set = ADE20KDataset(data_root, "training", TrainTransform(
        recipe.img_scale, recipe.ratio_range, recipe.crop_size, recipe.cat_max_ratio, recipe.flip_prob,
        seed=seed + 1000 * info.rank))
    try:
        val_set: Optional[ADE20KDataset] = ADE20KDataset(data_root, "validation")
    except FileNotFoundError as exc:
        _logger.warning("no validation split, training without evaluation: %s", exc)
        val_set = None

    model = build_segmentor(recipe)
    if pretrained:
        model.backbone.load_pretrained(pretrained)
    if grad_checkpointing:  # trades backbone recomputation for activation memory
        model.backbone.set_grad_checkpointing(True)
    if info.distributed and device.type == "cuda":  # SyncBatchNorm runs on GPUs only; CPU (gloo) runs keep BatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, recipe)
    use_amp = recipe.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start = 0
    latest = output / "latest.pth"
    if resume:
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {latest}")
        ckpt = read_checkpoint(latest)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        if info.is_main:
            _logger.info("resumed from %s at iteration %d", latest, start)
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if info.distributed else model

    sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=seed) if info.distributed else \
        torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(seed + start))
    loader = DataLoader(train_set, batch_size=recipe.batch_per_gpu, sampler=sampler, num_workers=workers,
                        collate_fn=collate_skip, drop_last=len(train_set) >= recipe.batch_per_gpu * info.world_size,
                        pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                        persistent_workers=workers > 0)
    steps_per_epoch = max(len(loader), 1)
    if info.is_main:
        _logger.info("training %s: %d images (%d skipped), batch %d x %d processes, %d iterations from %d",
                     recipe.name, len(train_set), len(train_set.skipped), recipe.batch_per_gpu, info.world_size,
                     recipe.iters, start)

    log_path = output / "log.jsonl"
    skipped_samples = 0
    last_eval: Dict[str, object] = {}
    batches = _infinite(loader, start // steps_per_epoch)
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=recipe.iters, initial=start, desc="train", unit="it", dynamic_ncols=True)
    net.train()
    t0 = time.time()
    it = start
    while it < recipe.iters:
        batch = next(batches)
        skipped_samples += int(batch["skipped"])
        if "img" not in batch:
            continue  # every sample of this batch was unreadable
        img = batch["img"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
        with autocast:
            losses = net(img, label)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        it += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if info.is_main and (it % recipe.log_interval == 0 or it == recipe.iters):
            rec = {"iter": it, "lr": optimizer.param_groups[0]["lr"], "time": time.time() - t0,
                   "skipped_samples": skipped_samples, **{k: float(v.detach()) for k, v in losses.items()}}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if info.is_main and (it % recipe.ckpt_interval == 0 or it == recipe.iters):
            save_checkpoint(latest, model, recipe, it, optimizer, scheduler, scaler)
            if it % recipe.ckpt_interval == 0:
                save_checkpoint(output / f"iter_{it}.pth", model, recipe, it)
        if val_set is not None and (it % recipe.eval_interval == 0 or it == recipe.iters):
            last_eval = evaluate(net, val_set, recipe, mode=eval_mode or recipe.test_mode, device=device, info=info,
                                 progress=progress)
            last_eval["iter"] = it
            if info.is_main:
                _logger.info("iter %d: mIoU %.2f aAcc %.2f mAcc %.2f", it, 100 * last_eval["mIoU"],
                             100 * last_eval["aAcc"], 100 * last_eval["mAcc"])
                write_json(output / "eval_latest.json", last_eval)
            net.train()
    if bar is not None:
        bar.close()
    if skipped_samples and info.is_main:
        _logger.warning("skipped %d unreadable training samples", skipped_samples)
    last_eval["skipped_train_samples"] = skipped_samples + len(train_set.skipped)
    barrier(info)
    return last_eval


# ------------------------------------------------------------------------------------------------------------ predict
@torch.no_grad()
def predict_image(model: nn.Module, recipe: SegRecipe, image_path, mode: str = "whole",
                  device: Optional[torch.device] = None) -> Tuple["np.ndarray", "np.ndarray"]:
    """(RGB uint8 image (H, W, 3), predicted class map (H, W) int64) for one image file."""
    from .data import load_pair, normalize

    device = device or next(model.parameters()).device
    rgb, _ = load_pair(Path(image_path), None)
    model.eval()
    probs = predict_probs(model, normalize(rgb)[None].to(device), img_scale=recipe.img_scale,
                          crop_size=recipe.slide_crop, stride=recipe.slide_stride,
                          **inference_settings(mode, recipe.ms_ratios))
    return rgb, probs.argmax(1)[0].cpu().numpy()


def render_overlay(rgb: "np.ndarray", pred: "np.ndarray", num_classes: int, alpha: float = 0.5) -> "np.ndarray":
    """The class map coloured with the ADE20K palette and blended over the image: (H, W, 3) uint8."""
    import numpy as np

    from .ade20k_meta import palette_for

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    palette = np.asarray(palette_for(num_classes), dtype=np.float32)
    colour = palette[np.clip(pred, 0, num_classes - 1)]
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
