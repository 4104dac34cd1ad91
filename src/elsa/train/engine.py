"""The classification training engine behind ``elsa train``: timm's building blocks wired into one loop.

Why timm's pieces (create_transform, Mixup, create_optimizer_v2, create_scheduler_v2, ModelEmaV3, its losses and
``accuracy``): they are what the official ELSA recipe was trained with, so the README flags mean the same here.
What this module adds: checked data, the loss and the per-epoch evaluation; the loop, AMP, DDP, resume and
checkpoints are ``elsa.engine``'s. The run folder layout:

    RUN_DIR/args.yaml  metrics.jsonl  metrics.csv  last.pth  best.pth  model.safetensors  [events/]
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import yaml

from ..checkpoint import CheckpointError, load_training_checkpoint, read_checkpoint
from ..data import (DatasetError, SkipUnreadable, build_train_transform, collate_skipped, create_dataset,
                    resolve_model_data_config)
from ..data.token_label import TokenLabelDataset, TokenLabelTransform, collate_token_label
from ..engine import run_dir
from ..engine import (CheckpointHook, Hook, Interrupted, ProgressHook, Runtime, StepOutput, Trainer, TrainState,
                      cleanup_runtime, init_runtime, seed_everything, seed_worker)
from ..io import atomic_write_text, save_safetensors
from .config import TrainConfig, validate_config
from .evaluation import score
from .metrics import MetricsLog, require_tensorboard
from .token_label import ForwardTrain, TokenLabelLoss, check_token_label_model

_logger = logging.getLogger("elsa.train")


@dataclass
class TrainResult:
    """What a finished run reports (also in RUN_DIR/metrics.jsonl)."""
    run_dir: Optional[Path]
    epochs_done: int
    best_top1: float
    best_epoch: int
    last: Dict[str, Any]


def _plain(value: Any) -> Any:
    """Options as YAML/torch-safe plain values (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Files whose presence marks a folder as holding a (finished or resumable) run that must not be overwritten.
RUN_FILES = ("last.pth", "best.pth", "model.safetensors", "metrics.jsonl")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` already holds the results of a training run."""
    return run_dir.holds_run(folder, RUN_FILES)


def resolve_run_dir(cfg: TrainConfig, img_size: Optional[int] = None) -> Path:
    """--output/--experiment (default output/train/DATE-TIME-MODEL-SIZE); when resuming without them, the folder
    of the resumed checkpoint.

    A folder that already holds another run is never overwritten without --overwrite: as timm's train.py
    (``get_outdir(inc=True)``), the run goes to the first free ``NAME-1``, ``NAME-2``, ... instead, and says so.
    Resuming into the resumed checkpoint's own folder continues that run there."""
    if cfg.resume and cfg.output is None and cfg.experiment is None:
        return Path(cfg.resume).resolve().parent
    name = cfg.experiment or "-".join([datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), cfg.model,
                                       str(img_size or cfg.img_size or "default")])
    folder = Path(cfg.output or os.path.join("output", "train")) / name
    if cfg.resume and folder.resolve() == Path(cfg.resume).resolve().parent:
        return folder
    return run_dir.free_run_dir(folder, RUN_FILES, cfg.overwrite)


@contextlib.contextmanager
def flag_errors(cfg: TrainConfig, names: Sequence[str]):
    """Errors that the factories of timm/torch raise for a bad option value (a bare AssertionError for
    ``--aa garbage``, a KeyError for an unknown interpolation, ...) become one ValueError naming the option:
    the one of ``names`` whose value the message quotes, else all of ``names``. Errors that already name their
    cause (data, checkpoint) pass through."""
    try:
        yield
    except (DatasetError, CheckpointError):
        raise
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, NotImplementedError, ArithmeticError) as err:
        text = str(err) if not isinstance(err, KeyError) else f"unknown value {err}"
        quoted = [n for n in names if _quotes(text, getattr(cfg, n, None))]
        flags = " / ".join(f"--{n.replace('_', '-')}" for n in (quoted or names))
        value = f" {getattr(cfg, quoted[0])!r}" if len(quoted) == 1 else ""
        raise ValueError(f"{flags}{value}: {text or type(err).__name__}") from err


def _quotes(text: str, value: Any) -> bool:
    """Whether an error message quotes an option's (text) value."""
    return isinstance(value, str) and len(value) > 1 and value in text


AUG_OPTIONS = ("aa", "train_interpolation", "interpolation", "remode", "scale", "ratio", "hflip", "vflip",
               "color_jitter", "reprob", "recount", "img_size", "crop_pct")
AUG_FLAGS = " / ".join(f"--{n.replace('_', '-')}" for n in AUG_OPTIONS)


def check_transform(transform, what: str) -> None:
    """Run ``transform`` once on a synthetic image, so options that only fail when applied (``--ratio 0 0``: a
    math domain error in the random-resized crop) are reported as option errors before training, not as
    unreadable images."""
    import numpy as np
    from PIL import Image

    from ..data.folder import TransformError, apply_transform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    try:
        apply_transform(transform, image)
    except TransformError as err:
        raise ValueError(f"{what}: {err.__cause__ or err}; check {AUG_FLAGS}") from err


def build_datasets(cfg: TrainConfig):
    """Train and val data sets (checked before any model is built); val must have the training classes."""
    train_ds = create_dataset(cfg.data, "train", data_dir=cfg.data_dir, download=cfg.dataset_download,
                              subset=cfg.train_subset)
    classes = getattr(train_ds, "classes", None)
    val_ds = create_dataset(cfg.data, "val", classes=classes, data_dir=cfg.data_dir,
                            download=cfg.dataset_download, subset=cfg.val_subset)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(f"data {cfg.data!r}: the train ({len(train_ds)}) and val ({len(val_ds)}) splits must "
                         f"not be empty")
    return train_ds, val_ds


def _create_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    import timm

    from .. import models as _models  # noqa: F401 - registers the ELSA models with timm

    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_rate=cfg.drop)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.pretrained_path)
    if not timm.models.is_model(cfg.model):
        raise ValueError(f"--model {cfg.model!r} is not a registered timm model (try `elsa models`)")
    if cfg.pretrained_path:
        from ..checkpoint import read_checkpoint

        read_checkpoint(cfg.pretrained_path, "--pretrained-path file")  # missing/empty/truncated: one clear line
    elif cfg.pretrained and not _has_hosted_weights(cfg.model):
        raise ValueError(f"--pretrained: no hosted pretrained weights are registered for {cfg.model!r}; download "
                         f"the weights file and pass --pretrained-path FILE (or --initial-checkpoint FILE)")
    try:
        with flag_errors(cfg, ("model", "drop", "drop_path", "num_classes")):
            model = timm.create_model(cfg.model, pretrained=cfg.pretrained or bool(cfg.pretrained_path), **kwargs)
    except (RuntimeError, OSError) as err:
        if isinstance(err, CheckpointError) or not (cfg.pretrained or cfg.pretrained_path):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if cfg.pretrained_path:
            raise ValueError(f"--pretrained-path {cfg.pretrained_path!r} does not fit --model {cfg.model!r}: "
                             f"{first}") from err
        raise ValueError(f"--pretrained: the pretrained weights of {cfg.model!r} could not be loaded ({first}); "
                         f"download them and pass --pretrained-path FILE") from err
    if cfg.initial_checkpoint:
        _load_initial_checkpoint(model, cfg.initial_checkpoint)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _has_hosted_weights(model_name: str) -> bool:
    """Whether timm knows where to get ``model_name``'s pretrained weights (a URL, a Hub id or a file)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    return cfg is not None and bool(cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict)


def _load_initial_checkpoint(model: nn.Module, path: str) -> None:
    """Weights from a file (ours, official, timm-style); a classifier of another size is left at its init."""
    from ..checkpoint import read_checkpoint, unwrap_state_dict

    state = unwrap_state_dict(read_checkpoint(path, "--initial-checkpoint file"))
    own = model.state_dict()
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in dropped:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    _logger.info("--initial-checkpoint %s: loaded; left at init (shape differs): %s; missing: %s; unexpected: %s",
                 path, dropped or "none", list(result.missing_keys) or "none", list(result.unexpected_keys) or "none")


def _token_label_dataset(cfg: TrainConfig, train_ds, model: nn.Module, data_config: Dict[str, Any],
                         num_classes: int) -> TokenLabelDataset:
    """The training set with label maps (--token-label-dir) and the shared crop/flip transform; the model
    must have a token head, and gets mix-token from --mix-token."""
    from timm.data import create_transform

    check_token_label_model(model, cfg.model)
    img_size = data_config["input_size"][-1]
    token_size = cfg.token_label_size or img_size // 16
    parts = create_transform(data_config["input_size"], is_training=True, scale=tuple(cfg.scale),
                             ratio=tuple(cfg.ratio), hflip=cfg.hflip, vflip=cfg.vflip,
                             color_jitter=cfg.color_jitter, auto_augment=cfg.aa or None,
                             interpolation=cfg.train_interpolation or data_config["interpolation"],
                             mean=data_config["mean"], std=data_config["std"], re_prob=cfg.reprob,
                             re_mode=cfg.remode, re_count=cfg.recount, separate=True)
    dataset = TokenLabelDataset(train_ds, cfg.token_label_dir, TokenLabelTransform(parts, num_classes, token_size))
    model.mix_token = bool(cfg.mix_token)
    _logger.info("token labeling: label maps %s, %dx%d token targets, dense weight %g, mix-token %s",
                 cfg.token_label_dir, token_size, token_size, cfg.dense_weight, "on" if cfg.mix_token else "off")
    return dataset


def train(cfg: TrainConfig) -> TrainResult:
    """Run a whole training (single process or one rank of a torchrun job). Returns the final numbers."""
    validate_config(cfg)
    if cfg.apex_amp:
        _logger.info("--apex-amp: NVIDIA apex is not used; mapped to native torch AMP (--amp)")
        cfg.amp = True
    runtime = init_runtime(cfg.device, amp=cfg.amp, amp_dtype_name=cfg.amp_dtype)
    try:
        return _train(cfg, runtime)
    finally:
        cleanup_runtime()


def _loss_fn(cfg: TrainConfig, num_classes: int, token_label: bool):
    """(training loss, timm Mixup or None) for the options."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixing = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
    if token_label:
        if mixing:
            _logger.info("token labeling: --mixup/--cutmix are off (VOLO uses mix-token instead)")
        return TokenLabelLoss(num_classes, dense_weight=cfg.dense_weight, smoothing=cfg.smoothing), None
    if mixing:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup_fn
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


def _train(cfg: TrainConfig, runtime: Runtime) -> TrainResult:
    from timm.data import create_transform
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    if not runtime.is_main:
        _logger.setLevel(logging.WARNING)
    device = runtime.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.no_prefetcher:
        _logger.debug("--no-prefetcher: accepted; this engine always uses the plain torch DataLoader")
    if cfg.log_tensorboard and runtime.is_main:
        require_tensorboard()  # fail before training, not after the first epoch

    # 1. data first: a wrong path or layout fails before any model is built
    train_ds, val_ds = build_datasets(cfg)
    classes = list(getattr(train_ds, "classes", None) or [])
    n_data_classes = len(classes) if classes else None
    num_classes = cfg.num_classes or n_data_classes
    if num_classes is None:
        raise ValueError(f"data {cfg.data!r} does not name its classes; pass --num-classes")
    if n_data_classes is not None and num_classes < n_data_classes:
        raise ValueError(f"--num-classes {num_classes} is smaller than the {n_data_classes} classes of the data")
    warn_degenerate_classes(cfg.data, classes, num_classes)

    # 2. model: identical initial weights on every rank (DDP also broadcasts rank 0's)
    seed_everything(cfg.seed)
    model = _create_model(cfg, num_classes)
    with flag_errors(cfg, ("interpolation", "img_size", "crop_pct")):
        data_config = resolve_model_data_config(model, cfg.img_size, cfg.crop_pct, cfg.interpolation)
    token_label = cfg.token_label_dir is not None
    with flag_errors(cfg, AUG_OPTIONS):
        if token_label:
            train_ds = _token_label_dataset(cfg, train_ds, model, data_config, num_classes)
        else:
            train_ds.transform = build_train_transform(
                cfg.data, data_config, no_aug=cfg.no_aug, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode,
                re_count=cfg.recount, digits_shift=cfg.digits_shift)
        val_ds.transform = create_transform(data_config["input_size"], is_training=False,
                                            interpolation=data_config["interpolation"], mean=data_config["mean"],
                                            std=data_config["std"], crop_pct=data_config["crop_pct"],
                                            crop_mode=data_config.get("crop_mode"))
    if not token_label:
        check_transform(train_ds.transform, "the training transform")
    check_transform(val_ds.transform, "the evaluation transform")
    train_model: nn.Module = ForwardTrain(model) if token_label else model
    train_model = runtime.wrap(train_model, sync_bn=cfg.sync_bn)
    n_params = sum(p.numel() for p in model.parameters())
    _logger.info("model %s: %.2f M params, %d classes, input %s, train %d / val %d images",
                 cfg.model, n_params / 1e6, num_classes, tuple(data_config["input_size"]), len(train_ds), len(val_ds))

    # 3. optimisation
    global_batch = cfg.batch_size * runtime.world_size
    lr = cfg.lr * global_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
    if cfg.lr_base_size:
        _logger.info("lr %.3g for global batch %d (recipe lr %.3g is for %d, scaled linearly)",
                     lr, global_batch, cfg.lr, cfg.lr_base_size)
    opt_kwargs: Dict[str, Any] = {}
    if cfg.opt_eps is not None:
        opt_kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        opt_kwargs["betas"] = tuple(cfg.opt_betas)
    with flag_errors(cfg, ("opt", "opt_eps", "opt_betas", "momentum", "weight_decay", "lr")):
        try:
            optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                            momentum=cfg.momentum, **opt_kwargs)
        except RuntimeError as err:  # timm: "Optimizer X not found in registry"
            raise ValueError(str(err)) from err
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None

    # 4. loaders: DistributedSampler also for one process, so N ranks of batch b see the same global batches as
    #    one process of batch N*b (same seed and epoch)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=runtime.world_size, rank=runtime.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=False)
    per_rank = len(sampler)
    if per_rank < cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {per_rank} training images per process "
                         f"({len(train_ds)} images over {runtime.world_size} process(es))")
    loader_kwargs = dict(num_workers=cfg.workers, pin_memory=cfg.pin_mem and device.type == "cuda",
                         collate_fn=collate_skipped, persistent_workers=cfg.workers > 0, worker_init_fn=seed_worker)
    train_loader = torch.utils.data.DataLoader(SkipUnreadable(train_ds), batch_size=cfg.batch_size,
                                               sampler=sampler, drop_last=True,
                                               **dict(loader_kwargs, collate_fn=collate_token_label if token_label
                                                      else collate_skipped))
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(SkipUnreadable(val_ds), runtime.shard(len(val_ds))),
        batch_size=cfg.validation_batch_size or cfg.batch_size, shuffle=False, **loader_kwargs)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    with flag_errors(cfg, ("sched", "epochs", "warmup_epochs", "cooldown_epochs", "decay_epochs", "decay_rate",
                           "min_lr", "warmup_lr")):
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
            decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
            cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=not cfg.sched_on_updates,
            updates_per_epoch=steps_per_epoch)
    with flag_errors(cfg, ("mixup_mode", "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob",
                           "smoothing", "dense_weight")):
        loss_fn, mixup_fn = _loss_fn(cfg, num_classes, token_label)

    # 5. train state; resume
    state = TrainState(model, optimizer, scheduler, runtime.grad_scaler(), ema, extra={
        "best_top1": -1.0, "best_epoch": 0, "arch": cfg.model, "num_classes": num_classes, "classes": classes,
        "data_config": _plain(data_config), "args": _plain(cfg.to_dict())})
    if cfg.resume:
        ckpt = load_training_checkpoint(cfg.resume)
        check_resume_fits(ckpt, cfg, num_classes)
        try:
            resumed_rng = state.load_state_dict(ckpt, runtime)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"--resume file {cfg.resume!r} does not fit this run ({_describe_run(ckpt)}): "
                                  f"{first}") from err
        if not resumed_rng:
            seed_everything(cfg.seed + runtime.rank + 1000 * state.epoch)
        if "iteration" not in ckpt:
            state.iteration = state.epoch * steps_per_epoch
        state.extra.update(best_top1=float(ckpt.get("best_top1", -1.0)), best_epoch=int(ckpt.get("best_epoch", 0)))
        _logger.info("resumed %s: %d epoch(s) done, step %d, best top-1 %.2f", cfg.resume, state.epoch,
                     state.iteration, state.extra["best_top1"])
    else:
        seed_everything(cfg.seed + runtime.rank)  # different augmentation on each rank
    start_epoch = state.epoch

    # 6. run folder (rank 0 only writes)
    run_dir = resolve_run_dir(cfg, data_config["input_size"][-1]) if runtime.is_main else None
    log = None
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))
        log = MetricsLog(run_dir, tensorboard=cfg.log_tensorboard, start_epoch=start_epoch)
        _logger.info("run folder %s; %d epoch(s) of %d step(s), global batch %d, %d process(es)", run_dir,
                     num_epochs, steps_per_epoch, global_batch, runtime.world_size)

    def step(net: nn.Module, batch) -> StepOutput:
        images, targets, n_skipped = batch
        images = images.to(device, non_blocking=True)
        if isinstance(targets, (tuple, list)):  # token labeling: (class indices, dense targets)
            targets = tuple(t.to(device, non_blocking=True) for t in targets)
        else:
            targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return StepOutput({"loss": loss_fn(net(images), targets)}, images.shape[0], n_skipped)

    epoch_hook = _EpochEnd(cfg, runtime, val_loader, log, mixup_fn, num_epochs)
    end_epoch = num_epochs if not cfg.stop_after_epochs else min(num_epochs, start_epoch + cfg.stop_after_epochs)
    hooks = [ProgressHook(cfg.progress, per_epoch=True, epoch_steps=steps_per_epoch), epoch_hook]
    folder = Path(run_dir or ".")  # rank 0's; the other ranks only take part in gathering the RNG states
    hooks.append(CheckpointHook(folder / "last.pth", every_epochs=1, best_path=folder / "best.pth",
                                is_best=lambda t: epoch_hook.is_best))
    trainer = Trainer(runtime, state, train_model, train_loader, step, max_epochs=num_epochs, stop_epoch=end_epoch,
                      steps_per_epoch=steps_per_epoch, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, hooks=hooks)
    try:
        trainer.fit()
    except Interrupted as stop:
        if log is not None:
            log.close()
        where = f"interrupted in epoch {stop.epoch + 1} of {num_epochs} (iteration {stop.iteration})"
        if stop.checkpoint is None:
            raise KeyboardInterrupt(f"{where}, before the first checkpoint: nothing to resume") from None
        raise KeyboardInterrupt(f"{where}; continue with: elsa train --resume {stop.checkpoint}") from None

    best_top1, best_epoch = state.extra["best_top1"], state.extra["best_epoch"]
    if state.epoch < num_epochs:
        _logger.info("--stop-after-epochs %d: stopping after epoch %d of %d; continue with --resume %s",
                     cfg.stop_after_epochs, state.epoch, num_epochs, (run_dir or Path(".")) / "last.pth")
    elif runtime.is_main:
        export_weights(run_dir, state, cfg, num_classes, classes, data_config, num_epochs)
    if log is not None:
        log.close()
    if cfg.save_rank_params:
        out = Path(cfg.save_rank_params)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{runtime.rank}.pt")
    runtime.barrier()
    return TrainResult(run_dir, state.epoch, best_top1, best_epoch, epoch_hook.last)


def warn_degenerate_classes(data: Optional[str], classes: list, num_classes: int) -> None:
    """Say clearly when the labels make accuracy meaningless: one class (every prediction is right, top-1 100% by
    construction) or fewer classes than 5 (top-5 is then top-k with k = number of classes: timm's
    ``accuracy`` clamps k to the number of outputs the same way)."""
    n = len(classes) if classes else num_classes
    if n <= 1:
        _logger.warning("data %r has a single class%s: a classifier needs at least 2; its accuracy will be 100%% by "
                        "construction and means nothing", data, f" ({classes[0]!r})" if classes else "")
    elif n < 5:
        _logger.info("data %r has %d classes: top-5 is reported as top-%d (timm's accuracy clamps k to the number "
                     "of classes; metrics keep the name val_top5)", data, n, n)


def _describe_run(ckpt: Dict[str, Any]) -> str:
    arch = ckpt.get("arch") or (ckpt.get("args") or {}).get("model") or "an unknown model"
    n = ckpt.get("num_classes")
    return f"it was written by a run of {arch}" + (f" with {n} classes" if n is not None else "")


def check_resume_fits(ckpt: Dict[str, Any], cfg: TrainConfig, num_classes: int) -> None:
    """A --resume file of another architecture or class count is one clear error naming what it is for (not the
    hundreds of size-mismatch lines of ``load_state_dict``)."""
    arch = ckpt.get("arch") or (ckpt.get("args") or {}).get("model")
    n = ckpt.get("num_classes")
    if arch is not None and arch != cfg.model:
        raise CheckpointError(f"--resume file {cfg.resume!r} is a checkpoint of {arch!r}, not of --model "
                              f"{cfg.model!r} ({_describe_run(ckpt)}); resume with --model {arch} or start anew")
    if n is not None and int(n) != num_classes:
        raise CheckpointError(f"--resume file {cfg.resume!r} has a {n}-class classifier but this run has "
                              f"{num_classes} classes ({_describe_run(ckpt)}); check DATA and --num-classes")


def weights_metadata(cfg: TrainConfig, num_classes: int, classes: list, data_config: Dict[str, Any],
                     which: str, epoch: int, top1: float) -> Dict[str, str]:
    """The ``.safetensors`` metadata (text only) that lets the tools rebuild the model without flags: the
    architecture, class names and data config, and which weights the file holds."""
    return {"arch": cfg.model, "num_classes": str(num_classes), "classes": json.dumps(list(classes)),
            "data_config": json.dumps(_plain(data_config)), "weights": which, "epoch": str(epoch),
            "val_top1": f"{top1:.4f}", "format": "elsa-train"}


def export_weights(run_dir: Path, state: TrainState, cfg: TrainConfig, num_classes: int, classes: list,
                   data_config: Dict[str, Any], num_epochs: int) -> None:
    """Write the best epoch's weights (the ones best.pth holds: the epoch with the highest val top-1, of the EMA
    weights when there is EMA) as model.safetensors (and model_ema.safetensors), with what they are in the
    metadata; the last epoch's weights stay in last.pth."""
    best_top1, best_epoch = state.extra["best_top1"], state.extra["best_epoch"]
    best_path = run_dir / "best.pth"
    source = read_checkpoint(best_path, "best.pth") if best_path.is_file() else None
    if source is None:  # no epoch was evaluated as best (cannot happen after a full run): the last weights
        weights, ema_weights, which, epoch = state.model.state_dict(), None, "last", state.epoch
        ema_weights = state.ema.module.state_dict() if state.ema is not None else None
    else:
        weights, ema_weights, which, epoch = source["model"], source.get("model_ema"), "best", best_epoch
    meta = weights_metadata(cfg, num_classes, classes, data_config, which, epoch, best_top1)
    save_safetensors(weights, run_dir / "model.safetensors", metadata=meta)
    if ema_weights is not None:
        save_safetensors(ema_weights, run_dir / "model_ema.safetensors", metadata=meta)
    _logger.info("done: best top-1 %.2f at epoch %d of %d; weights of that %s epoch: %s%s (the last epoch's are "
                 "in %s)", best_top1, best_epoch, num_epochs, which, run_dir / "model.safetensors",
                 " and model_ema.safetensors" if ema_weights is not None else "", run_dir / "last.pth")


class _EpochEnd(Hook):
    """Classification's part of each epoch: mixup switched off at --mixup-off-epoch; after the epoch, evaluation
    (and of the EMA weights), the best top-1 (EMA's when there is one, as timm), the metrics row and summary."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, val_loader, log: Optional[MetricsLog], mixup_fn,
                 num_epochs: int) -> None:
        self.cfg, self.runtime, self.val_loader, self.log, self.mixup_fn = cfg, runtime, val_loader, log, mixup_fn
        self.num_epochs = num_epochs
        self.is_best = False
        self.last: Dict[str, Any] = {}

    def before_epoch(self, trainer: Trainer) -> None:
        if self.mixup_fn is not None and self.cfg.mixup_off_epoch and trainer.state.epoch >= self.cfg.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False

    def after_epoch(self, trainer: Trainer) -> None:
        st, stats = trainer.state, trainer.epoch_stats
        t0 = time.perf_counter()
        val = evaluate(st.model, self.val_loader, self.runtime)
        row: Dict[str, Any] = {
            "epoch": st.epoch, "train_loss": stats["loss"], "val_loss": val["loss"], "val_top1": val["top1"],
            "val_top5": val["top5"], "lr": stats["lr"], "images_per_s": stats["samples_per_s"],
            "skipped_images": int(stats["skipped"] + val["skipped"])}
        metric = val["top1"]
        if st.ema is not None:
            ema_val = evaluate(st.ema.module, self.val_loader, self.runtime)
            row.update(val_loss_ema=ema_val["loss"], val_top1_ema=ema_val["top1"], val_top5_ema=ema_val["top5"])
            metric = ema_val["top1"]  # as timm: with EMA, the EMA weights are the ones kept as best
        self.is_best = metric > st.extra["best_top1"]
        if self.is_best:
            st.extra.update(best_top1=metric, best_epoch=st.epoch)
        row["epoch_time_s"] = stats["seconds"] + time.perf_counter() - t0  # training and evaluation
        if self.log is not None:
            self.log.add(row)
            _logger.info("epoch %d/%d: train loss %.4f | val loss %.4f top-1 %.2f top-%d %.2f%s | lr %.3g | "
                         "%.0f img/s | %.1f s%s", st.epoch, self.num_epochs, row["train_loss"], row["val_loss"],
                         row["val_top1"], val["topk"], row["val_top5"],
                         f" (EMA top-1 {row['val_top1_ema']:.2f})" if st.ema is not None else "", row["lr"],
                         row["images_per_s"], row["epoch_time_s"],
                         f" | skipped {row['skipped_images']} unreadable image(s)" if row["skipped_images"] else "")
        self.last = row


def evaluate(model: nn.Module, loader, runtime: Runtime) -> Dict[str, float]:
    """Loss, top-1 and top-5 (top-k, k = min(5, classes); percent) over this rank's shard, summed over all ranks;
    unreadable images counted."""
    skipped = 0

    def batches():
        nonlocal skipped
        for images, targets, n_skipped in loader:
            skipped += n_skipped
            yield images, targets

    c = score(model, batches(), runtime.device, runtime.autocast)
    loss_sum, top1, top5, n, skipped = runtime.all_reduce_sum([c.loss_sum, c.correct1, c.correctk, c.count, skipped])
    n = max(n, 1)
    return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "skipped": skipped,
            "topk": c.topk}
