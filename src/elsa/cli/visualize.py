"""`elsa visualize`: what one ELSA block attends to at a few pixels of an image, as a PNG.

For each chosen pixel: each head's K x K Hadamard attention (softmax), the head's ghost head (m ** lam and/or
d * gamma, averaged over the head's channels; the same at every pixel) and the combined filter mean(m * a + d).
Pixels are (y, x) in the model input, i.e. after resizing/cropping to the model's input size.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_threads_option, command


def _pixel(text: str) -> tuple[int, int]:
    """argparse type for 'y,x'."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        y, x = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel as 'y,x' (two integers), got {text!r}") from None
    return y, x


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("visualize", help="PNG of an ELSA block's attention at chosen pixels",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--model", "-m", required=True, help="timm model name with ELSA blocks, e.g. elsa_swin_tiny")
    p.add_argument("--checkpoint", required=True, help="official .pth, training checkpoint, or .safetensors")
    p.add_argument("--pixels", type=_pixel, nargs="+", default=None, metavar="Y,X",
                   help="pixels (y,x) of the model input (default: three on the diagonal)")
    p.add_argument("--block", default=None, help="ELSA block, e.g. layers.0.blocks.0 (default: the first)")
    p.add_argument("--heads", default=None, metavar="H,H,...",
                   help="heads to show, e.g. 0,1,2 (default: all heads of the block)")
    p.add_argument("--out", default=None, help="output PNG (default: IMAGE_attention.png beside the image)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the checkpoint)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights of a training checkpoint")
    p.add_argument("--img-size", type=int, default=None, help="square input side (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_threads_option(p)
    p.set_defaults(func=command("visualize")(run))


def run(args: argparse.Namespace) -> int:
    from ..tools import (ToolError, attention_maps, checkpoint_info, create_model_from_checkpoint, eval_transform,
                         load_image, parse_ints, plot_attention_maps, resolve_device)

    heads = parse_ints(args.heads, "--heads") if args.heads else None
    device = resolve_device(args.device)
    image = load_image(args.image)
    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=args.num_classes,
                                         use_ema=args.use_ema, device=device)
    cfg, transform = eval_transform(model, args.img_size, stored=checkpoint_info(args.checkpoint).data_config)
    maps = attention_maps(model, transform(image), block=args.block, pixels=args.pixels,
                          mean=cfg["mean"], std=cfg["std"])
    out = args.out or str(Path(args.image).with_name(Path(args.image).stem + "_attention.png"))
    if not out.lower().endswith(".png"):
        raise ToolError(f"--out: the figure is written as PNG; give a .png file name, got {out!r}")
    plot_attention_maps(maps, out, heads=heads)
    print(f"wrote {out} (block {maps.block}, pixels {', '.join(f'({y},{x})' for y, x in maps.pixels)})")
    return 0
