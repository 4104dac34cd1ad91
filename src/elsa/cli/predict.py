"""`elsa predict`: the top-k classes of each image, as text or JSON.

Images are preprocessed with the data config an `elsa train` checkpoint (or its model.safetensors) stores, else
as the model's pretrained_cfg says (input size, crop_pct, interpolation, mean/std); --img-size etc. override it.
Class names: those of --class-names FILE, else the ones an `elsa train` checkpoint stores, else ImageNet-1k's
when the head has 1000 classes, else class indices.
"""
from __future__ import annotations

import argparse
import json
import sys

from ._common import add_threads_option, command


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="top-k classes of images", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    p.add_argument("--model", "-m", required=True, help="timm model name, e.g. elsa_swin_tiny")
    p.add_argument("--checkpoint", required=True, help="official .pth, training checkpoint, or .safetensors")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON (a list with one object per image)")
    p.add_argument("--class-names", default=None, help="file with one class name per line (or a .json list)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the checkpoint)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights of a training checkpoint")
    p.add_argument("--img-size", type=int, default=None, help="square input side (default: the model's)")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop ratio (default: the model's)")
    p.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    add_threads_option(p)
    p.set_defaults(func=command("predict")(run))


def run(args: argparse.Namespace) -> int:
    from ..tools import (ToolError, checkpoint_info, create_model_from_checkpoint, eval_transform, predict,
                         resolve_classes, resolve_device)

    if args.topk < 1:
        raise ToolError(f"--topk must be >= 1, got {args.topk}")
    device = resolve_device(args.device)
    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=args.num_classes,
                                         use_ema=args.use_ema, device=device)
    info = checkpoint_info(args.checkpoint)  # `elsa train` files remember their classes and data config
    names = resolve_classes(info, model.num_classes, args.class_names)
    _, transform = eval_transform(model, args.img_size, args.crop_pct, args.interpolation, stored=info.data_config)
    results = predict(model, args.images, transform, topk=args.topk, names=names, device=device, amp=args.amp)
    failed = [r for r in results if r.error is not None]
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.image)
            if r.error is not None:
                print(f"  error: {r.error}")
            for rank, (index, prob, name) in enumerate(r.classes, 1):
                label = f"{name} ({index})" if name is not None else f"class {index}"
                print(f"  {rank}. {100 * prob:6.2f}%  {label}")
    for r in failed:  # reported and skipped; the exit code says that not every image was predicted
        print(f"elsa predict: error: {r.error}", file=sys.stderr)
    return 2 if failed else 0
