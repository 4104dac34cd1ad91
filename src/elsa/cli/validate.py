"""`elsa validate`: top-1/top-5 accuracy and loss of a checkpoint on an image folder or the digits set.

Accepts the official README's command line verbatim, e.g.
`elsa validate /data/imagenet --model elsa_swin_base --checkpoint elsa_swin_base.pth --no-test-pool --apex-amp
--img-size 224 -b 128 --use-ema`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ._common import add_threads_option, command

_logger = logging.getLogger("elsa.validate")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="accuracy of a checkpoint on a validation set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA",
                   help="ImageFolder root (DATA/val is used when it exists; one folder per class) or 'digits'")
    p.add_argument("--model", "-m", required=True, help="timm model name, e.g. elsa_swin_tiny")
    p.add_argument("--checkpoint", required=True, help="official .pth, training checkpoint, or .safetensors")
    p.add_argument("--split", default=None, help="sub-folder of DATA to score (default: 'val' if present, else DATA)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the checkpoint)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights (state_dict_ema) of the checkpoint")
    p.add_argument("--img-size", type=int, default=None,
                   help="square input side (default: the checkpoint's, as trained; else the model's, 224)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="centre-crop ratio (default: the checkpoint's; else the model's, 0.9)")
    p.add_argument("--interpolation", default=None,
                   help="resize interpolation (default: the checkpoint's; else the model's, bicubic)")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading workers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--apex-amp", action="store_true", help="official flag; mapped to native --amp")
    p.add_argument("--no-test-pool", action="store_true",
                   help="official flag; accepted, no effect (ELSA-Swin pools the same way at any input size)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="score only the first N images (quick checks; default: all)")
    p.add_argument("--results-file", default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=command("validate")(run))


def run(args: argparse.Namespace) -> int:
    results = validate(args)
    print(f"{args.model}: top-1 {results['top1']:.3f}%  top-{results['topk']} {results['top5']:.3f}%  "
          f"loss {results['loss']:.4f}  ({results['num_images']} images, {results['images_per_s']:.1f} images/s"
          f"{'; ' + str(results['skipped']) + ' unreadable left out' if results.get('skipped') else ''})")
    return 0


def _dataset(args: argparse.Namespace, transform, classes=None):
    """The data set DATA names, and a short description of it for the results."""
    import torch

    from ..tools import ToolError, image_folder_dataset, resolve_split

    if args.data == "digits":
        try:
            from ..data import DigitsDataset
        except ImportError as err:
            raise ToolError(f"DATA: the built-in digits set is unavailable here: {err}") from err
        split = args.split or "val"
        if split not in ("train", "val", "validation"):
            raise ToolError(f"--split: the digits set has splits 'train' and 'val', got {split!r}")
        return DigitsDataset(split, transform=transform, subset=args.num_samples), f"digits/{split}"
    root = resolve_split(args.data, args.split)
    dataset = image_folder_dataset(root, transform, classes=classes)
    if args.num_samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.num_samples, len(dataset))))
    return dataset, str(root)


def validate(args: argparse.Namespace) -> dict:
    """Score the checkpoint; returns the results dict (also written to --results-file)."""
    import torch
    from tqdm import tqdm

    from ..io import atomic_write
    from ..tools import (ToolError, checkpoint_info, create_model_from_checkpoint, eval_transform, evaluate,
                         make_loader, resolve_device)

    if args.num_samples is not None and args.num_samples < 1:
        raise ToolError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = resolve_device(args.device)
    amp = args.amp or args.apex_amp
    if args.apex_amp:
        _logger.info("--apex-amp: using PyTorch native autocast (NVIDIA apex is not needed)")
    if args.no_test_pool:
        _logger.info("--no-test-pool: no effect; ELSA-Swin pools globally at any input size")
    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=args.num_classes,
                                         use_ema=args.use_ema, device=device)
    info = checkpoint_info(args.checkpoint)  # the data config and class names it was trained with
    cfg, transform = eval_transform(model, args.img_size, args.crop_pct, args.interpolation, stored=info.data_config)
    classes = info.classes if info.classes is not None and len(info.classes) == model.num_classes else None
    _logger.info("data config: input %s, crop_pct %s, %s, mean %s, std %s", cfg["input_size"], cfg["crop_pct"],
                 cfg["interpolation"], cfg["mean"], cfg["std"])
    dataset, source = _dataset(args, transform, classes)
    loader = make_loader(dataset, args.batch_size, args.workers, device)
    bar = None if args.no_progress else (
        lambda it: tqdm(it, total=len(loader), desc=f"validate {args.model}", unit="batch", file=sys.stderr))
    result = evaluate(model, loader, device=device, amp=amp, wrap=bar)
    results = dict(model=args.model, checkpoint=str(args.checkpoint), data=source, use_ema=args.use_ema,
                   input_size=list(cfg["input_size"]), crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                   device=str(device), amp=amp, torch=torch.__version__, **result.to_dict())
    if args.results_file:
        text = json.dumps(results, indent=2) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(args.results_file, write)
        _logger.info("wrote %s", args.results_file)
    return results
