"""``elsa train``: train an ELSA (or any timm) classifier; with no data, elsa_swin_pico on the built-in digits.

Accepts the official ELSA README's flags verbatim (timm train.py names), ``--recipe NAME`` for the built-in
recipes and ``--config FILE.yaml``; flags given on the command line override both. Under
``torchrun --nproc_per_node=N -m elsa train ...`` it trains with DDP.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict
from ._common import command

_logger = logging.getLogger("elsa.train")

S = argparse.SUPPRESS  # options not given are absent, so recipe/config values are not overridden by defaults


def _flag(group, *names: str, help: str, **kwargs) -> None:
    group.add_argument(*names, default=S, help=help, **kwargs)


def _on(group, *names: str, help: str) -> None:
    group.add_argument(*names, action="store_true", default=S, help=help)


def add_parser(subparsers) -> None:
    from ..train.config import TrainConfig, list_recipes

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a classifier (default: elsa_swin_pico on the built-in digits)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (official ELSA-Swin-T recipe, 8 GPUs):\n  torchrun --nproc_per_node=8 -m elsa train "
               "/data/imagenet --recipe elsa_swin_tiny_in1k\n"
               "defaults shown are those without a recipe; with no DATA the 'digits' recipe applies.")
    p.add_argument("data", nargs="?", default=S, metavar="DATA",
                   help="folder with train/CLASS/*.jpeg and val/CLASS/*.jpeg, 'digits' (built in), or a timm data "
                        "set such as torch/cifar10 (default: digits)")
    g = p.add_argument_group("recipe and config")
    _flag(g, "--recipe", choices=list_recipes(), help="built-in recipe (options as in the official README)")
    _flag(g, "--config", metavar="FILE.yaml", help="YAML file of option: value (flags override it)")
    g = p.add_argument_group("data")
    _flag(g, "--data-dir", metavar="DIR", help="root folder for timm data sets like torch/cifar10")
    _on(g, "--dataset-download", help="allow timm/torchvision to download the data set")
    _flag(g, "--train-subset", type=int, metavar="N", help="use only the first N training images")
    _flag(g, "--val-subset", type=int, metavar="N", help="use only the first N validation images")
    _flag(g, "--img-size", type=int, metavar="N", help="input size (default: the model's)")
    _flag(g, "--crop-pct", type=float, help="eval centre-crop ratio (default: the model's, 0.9 for ELSA-Swin)")
    _flag(g, "--interpolation", help="eval resize interpolation (default: the model's, bicubic)")
    _flag(g, "-b", "--batch-size", type=int, metavar="N", help=f"batch size per process (default {d.batch_size})")
    _flag(g, "-vb", "--validation-batch-size", type=int, metavar="N", help="validation batch size per process")
    _flag(g, "-j", "--workers", type=int, metavar="N", help=f"data loader processes per rank (default {d.workers})")
    _on(g, "--pin-mem", help="pin CPU memory of batches (CUDA)")
    _on(g, "--no-prefetcher", help="accepted for compatibility (the plain torch DataLoader is always used)")
    g = p.add_argument_group("model")
    _flag(g, "--model", help=f"timm model name (default {d.model})")
    _on(g, "--pretrained", help="start from the model's pretrained weights")
    _flag(g, "--pretrained-path", metavar="FILE", help="pretrained weights file (official .pth or ours)")
    _flag(g, "--initial-checkpoint", metavar="FILE", help="start from these weights (a differently sized "
                                                           "classifier is left at its init)")
    _flag(g, "--resume", metavar="FILE", help="resume a run from its last.pth (model, optimizer, schedule, EMA, "
                                              "scaler, epoch, RNG); its options are reused unless given again")
    _flag(g, "--num-classes", type=int, metavar="N", help="classifier size (default: number of class folders)")
    _flag(g, "--drop", type=float, metavar="P", help="dropout rate as the official models use it: after the patch "
                                                     "embedding and in every block's MLP and window-attention "
                                                     "projection (default 0)")
    _flag(g, "--drop-path", type=float, metavar="P", help="stochastic depth rate (default: the model's)")
    _on(g, "--grad-checkpointing", help="trade compute for memory")
    _on(g, "--sync-bn", help="use SyncBatchNorm under DDP (only if the model has BatchNorm)")
    g = p.add_argument_group("optimizer and schedule")
    _flag(g, "--opt", help=f"optimizer, any of timm's (default {d.opt})")
    _flag(g, "--opt-eps", type=float, help="optimizer epsilon")
    _flag(g, "--opt-betas", type=float, nargs="+", help="optimizer betas")
    _flag(g, "--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    _flag(g, "--weight-decay", type=float, help=f"weight decay (default {d.weight_decay})")
    _flag(g, "--clip-grad", type=float, metavar="NORM", help="clip gradients (default: off)")
    _flag(g, "--clip-mode", choices=["norm", "value", "agc"], help="gradient clipping mode (default norm)")
    _flag(g, "--sched", help=f"lr schedule, any of timm's (default {d.sched})")
    _flag(g, "--lr", type=float, help=f"learning rate (default {d.lr})")
    _flag(g, "--lr-base-size", type=int, metavar="N", help="--lr is for global batch N: scale it linearly")
    _flag(g, "--warmup-lr", type=float, help=f"warm-up start lr (default {d.warmup_lr})")
    _flag(g, "--min-lr", type=float, help=f"final lr (default {d.min_lr})")
    _flag(g, "--epochs", type=int, help=f"epochs (default {d.epochs})")
    _flag(g, "--warmup-epochs", type=int, help=f"warm-up epochs (default {d.warmup_epochs})")
    _flag(g, "--cooldown-epochs", type=int, help="epochs at min lr after the schedule (default 0)")
    _flag(g, "--decay-epochs", type=float, help="step schedule period")
    _flag(g, "--decay-rate", type=float, help="step schedule factor")
    _on(g, "--sched-on-updates", help="change the LR after every optimizer update (timm's option); default: once "
                                      "per epoch, as timm 0.4's train.py that trained the official models")
    g = p.add_argument_group("augmentation and regularisation")
    _on(g, "--no-aug", help="no training augmentation (resize, crop, normalise only)")
    _flag(g, "--scale", type=float, nargs=2, help="random-resized-crop area range (default 0.08 1)")
    _flag(g, "--ratio", type=float, nargs=2, help="random-resized-crop aspect range")
    _flag(g, "--hflip", type=float, help="horizontal flip probability (default 0.5)")
    _flag(g, "--vflip", type=float, help="vertical flip probability (default 0)")
    _flag(g, "--color-jitter", type=float, help="colour jitter (default 0.4)")
    _flag(g, "--aa", metavar="POLICY", help="auto augment policy, e.g. rand-m9-mstd0.5-inc1")
    _flag(g, "--train-interpolation", help="training resize interpolation (default random)")
    _flag(g, "--reprob", type=float, help="random erasing probability")
    _flag(g, "--remode", help="random erasing mode (default pixel)")
    _flag(g, "--recount", type=int, help="random erasing count")
    _flag(g, "--mixup", type=float, help="mixup alpha (0: off)")
    _flag(g, "--cutmix", type=float, help="cutmix alpha (0: off)")
    _flag(g, "--cutmix-minmax", type=float, nargs=2, help="cutmix min/max ratio")
    _flag(g, "--mixup-prob", type=float, help="probability of mixup or cutmix per batch")
    _flag(g, "--mixup-switch-prob", type=float, help="probability of cutmix instead of mixup")
    _flag(g, "--mixup-mode", choices=["batch", "pair", "elem"], help="how mixup parameters are drawn")
    _flag(g, "--mixup-off-epoch", type=int, help="turn mixup off from this epoch")
    _flag(g, "--smoothing", type=float, help=f"label smoothing (default {d.smoothing})")
    _flag(g, "--digits-shift", type=int, help="digits: random shift in pixels (default 3)")
    g2 = p.add_argument_group("token labeling (ELSA-VOLO, as VOLO's published training)")
    _flag(g2, "--token-label-dir", metavar="DIR", help="train with token labeling: DIR/<image file stem>.pt label "
          "maps, tensors (2, K, S, S) of [top-K scores, class indices]; mixup/cutmix are then off")
    _flag(g2, "--token-label-size", type=int, metavar="T", help="token grid of the dense targets (default: "
          "img-size // 16, VOLO's 14 at 224)")
    _flag(g2, "--dense-weight", type=float, metavar="W", help=f"weight of the token loss (default {d.dense_weight})")
    g2.add_argument("--mix-token", action=argparse.BooleanOptionalAction, default=S,
                    help="mix-token: swap a box of tokens with the flipped batch (default on with token labeling)")
    _on(g, "--model-ema", help="keep an exponential moving average of the weights")
    _flag(g, "--model-ema-decay", type=float, help=f"EMA decay (default {d.model_ema_decay})")
    _on(g, "--model-ema-warmup", help="EMA decay warm-up")
    g = p.add_argument_group("precision, device and run")
    _on(g, "--amp", help="mixed precision (CUDA: --amp-dtype; CPU: bfloat16)")
    _flag(g, "--amp-dtype", choices=["float16", "bfloat16"], help="autocast dtype on CUDA (default float16)")
    _on(g, "--apex-amp", help="accepted for the official commands; mapped to native --amp")
    _flag(g, "--device", help="cpu, cuda or cuda:N (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    _flag(g, "--threads", type=int, metavar="N", help="torch CPU threads per process (default: torch's choice; "
                                                      "1 is fastest on a busy machine)")
    _flag(g, "--seed", type=int, help=f"random seed (default {d.seed})")
    _flag(g, "--output", metavar="DIR", help="parent folder of run folders (default output/train)")
    _flag(g, "--experiment", metavar="NAME", help="run folder name (default: date-model-size); a folder holding "
                                                   "another run is never overwritten: NAME-1, NAME-2, ... is used")
    _on(g, "--overwrite", help="replace the run already in --output/--experiment instead of using NAME-1")
    _flag(g, "--stop-after-epochs", type=int, metavar="N", help="end this run after N epochs (the schedule still "
                                                                "spans --epochs); continue later with --resume")
    _flag(g, "--log-interval", type=int, help=argparse.SUPPRESS)
    _on(g, "--log-tensorboard", help="also write TensorBoard events to RUN_DIR/events (needs tensorboard)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    # test and debugging hooks, hidden from --help
    _flag(g, "--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    _flag(g, "--save-rank-params", help=argparse.SUPPRESS)
    p.set_defaults(func=command("train")(run))


def options_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The train options given on the command line (absent ones stay absent)."""
    from ..train.config import FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS}


def run(args: argparse.Namespace) -> int:
    from ..train import build_config, train

    result = train(build_config(options_from_args(args)))
    if result.run_dir is not None:
        _logger.info("best val top-1 %.2f%% (epoch %d); run folder %s", result.best_top1, result.best_epoch,
                     result.run_dir)
    return 0
