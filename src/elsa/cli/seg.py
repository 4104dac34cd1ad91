"""``elsa seg``: ADE20K semantic segmentation with ELSA-Swin + UPerNet (the official 160k-iteration setting).

  elsa seg train --recipe upernet_elsa_swin_tiny_160k --data ROOT [--pretrained CLS_CKPT] [--output DIR] [--resume]
  elsa seg test --recipe ... --checkpoint FILE --data ROOT [--mode whole|slide|ms-flip] [--json FILE]
  elsa seg predict IMAGE --recipe ... --checkpoint FILE --out FILE.png [--mode ...]

ROOT holds ADEChallengeData2016/images|annotations/training|validation (or is that folder). Multi-GPU:
``torchrun --nproc_per_node 8 -m elsa seg train ...`` (2 images per GPU as the official run).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._common import (add_threads_option, command, float_list, int_pair, json_object, non_negative_int,
                      positive_float, positive_int, recipe_overrides)

MODES = ("whole", "slide", "ms-flip")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe name (see `elsa seg recipes`)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA (default: float32, as the official runs)")
    add_threads_option(p)
    g = p.add_argument_group("recipe overrides", "change the recipe for a short run, a small GPU or a custom model "
                                                 "(test/predict: the architecture comes from the checkpoint)")
    g.add_argument("--num-classes", type=positive_int, default=None, help="number of classes (ADE20K: 150)")
    g.add_argument("--crop-size", type=int_pair, default=None, metavar="H[,W]",
                   help="training crop, also the slide-test window (official 512)")
    g.add_argument("--img-scale", type=int_pair, default=None, metavar="LONG,SHORT",
                   help="resize bounds before cropping / at test (official 2048,512)")
    g.add_argument("--iters", type=positive_int, default=None, help="training iterations (official 160000)")
    g.add_argument("--backbone", default=None, help="backbone name, or 'custom' with --backbone-kwargs")
    g.add_argument("--backbone-kwargs", type=json_object, default=None, metavar="JSON",
                   help="JSON overrides of the backbone architecture (e.g. a tiny model for tests)")
    g.add_argument("--head-channels", type=positive_int, default=None, help="UPerNet channels (official 512)")
    g.add_argument("--aux-channels", type=positive_int, default=None, help="FCN auxiliary head channels (official 256)")
    g.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (official 6e-5 for 16 images)")
    g.add_argument("--warmup-iters", type=non_negative_int, default=None, help="linear warm-up iterations "
                                                                                "(official 1500)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per GPU/process (official 2)")
    g.add_argument("--ckpt-interval", type=non_negative_int, default=None,
                   help="write a checkpoint every N iterations (official 16000; 0: at the end only)")
    g.add_argument("--eval-interval", type=non_negative_int, default=None,
                   help="evaluate every N iterations (official 16000; 0: at the end only)")
    g.add_argument("--log-interval", type=positive_int, default=None, help="log every N iterations (official 50)")
    g.add_argument("--ms-ratios", type=float_list, default=None, metavar="R,R,...",
                   help="test scales of --mode ms-flip (official 0.5,0.75,1.0,1.25,1.5,1.75)")
    g.add_argument("--no-amp", action="store_true", help="float32 even if the recipe turns autocast on")
    g.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=None,
                   help="turn autocast on with this dtype (default float16, CUDA only; bfloat16 also on CPU)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("seg", help="ADE20K semantic segmentation (UPerNet)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="seg_command", metavar="{train,test,predict,recipes}")
    t = sub.add_parser("train", help="train on ADE20K (iteration-based, resumable)")
    _add_common(t)
    t.add_argument("--data", required=True, help="ADE20K root")
    t.add_argument("--pretrained", default=None, help="ImageNet classification checkpoint for the backbone")
    t.add_argument("--output", default="output/seg", help="folder for checkpoints, log.jsonl and eval JSON")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/latest.pth")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUTPUT (default: a folder holding a run gives way to OUTPUT-1, ...)")
    t.add_argument("--workers", type=non_negative_int, default=4, help="data-loading processes per GPU (default 4)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--eval-mode", choices=MODES, default=None, help="evaluation mode during training (default whole)")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute backbone activations (less memory)")
    t.set_defaults(func=command("seg train")(run_train))
    e = sub.add_parser("test", help="mIoU / aAcc / per-class IoU on the validation split")
    _add_common(e)
    e.add_argument("--checkpoint", required=True, help="our checkpoint, or an official mmseg one (state_dict)")
    e.add_argument("--data", required=True, help="ADE20K root")
    e.add_argument("--mode", choices=MODES, default="whole", help="whole (default), slide (512 crops, stride 341) "
                                                                  "or ms-flip (ratios 0.5..1.75 + flip)")
    e.add_argument("--json", default=None, help="where to write the results (default: next to the checkpoint)")
    e.set_defaults(func=command("seg test")(run_test))
    q = sub.add_parser("predict", help="colour label map of one image, blended over it (PNG)")
    q.add_argument("image", metavar="IMAGE")
    _add_common(q)
    q.add_argument("--checkpoint", required=True, help="an `elsa seg train` checkpoint, or an official mmseg one")
    q.add_argument("--out", required=True, help="output PNG")
    q.add_argument("--mode", choices=MODES, default="whole", help="whole (default), slide or ms-flip, as for test")
    q.add_argument("--alpha", type=float, default=0.5, help="label-map opacity (default 0.5)")
    q.add_argument("--no-legend", action="store_true", help="no legend of the classes present")
    q.set_defaults(func=command("seg predict")(run_predict))
    r = sub.add_parser("recipes", help="list the segmentation recipes and their key settings")
    r.set_defaults(func=command("seg recipes")(run_recipes))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# flag (argparse dest) -> SegRecipe field; switches map to (field, value)
RECIPE_FLAGS = {
    "num_classes": "num_classes", "crop_size": "crop_size", "img_scale": "img_scale", "iters": "iters",
    "backbone": "backbone", "head_channels": "channels", "aux_channels": "aux_channels", "lr": "lr",
    "warmup_iters": "warmup_iters", "batch_size": "batch_per_gpu", "ckpt_interval": "ckpt_interval",
    "eval_interval": "eval_interval", "log_interval": "log_interval", "ms_ratios": "ms_ratios",
    "amp_dtype": "amp_dtype", "no_amp": ("amp", False), "amp": ("amp", True),
}
# the flags that may still change a checkpoint's stored recipe at test time (the architecture comes from the file)
TEST_FLAGS = ("ms_ratios", "img_scale", "crop_size")


def _with_slide(changes: dict) -> dict:
    """The sliding-window test follows the training crop (official: 512 / stride 341)."""
    if "crop_size" in changes:
        crop = changes["crop_size"]
        changes["slide_crop"] = crop
        changes["slide_stride"] = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    return changes


def _recipe(args: argparse.Namespace):
    """(recipe with the flags applied, whether any flag changed it)."""
    from ..dense.segmentation.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    changes = _with_slide(recipe_overrides(args, RECIPE_FLAGS))
    if "backbone_kwargs" in vars(args) and args.backbone_kwargs is not None:
        changes["backbone_kwargs"] = dict(recipe.backbone_kwargs, **args.backbone_kwargs)
    return recipe.replace(**changes) if changes else recipe, bool(changes)


def _recipe_over(recipe, args):
    """Apply the test-time overrides (ratios, scale, crops) on top of a checkpoint's stored recipe."""
    changes = _with_slide(recipe_overrides(args, {k: RECIPE_FLAGS[k] for k in TEST_FLAGS}))
    changes.pop("crop_size", None)
    return recipe.replace(**changes), bool(changes)


def run_train(args: argparse.Namespace) -> int:
    from ..dense.segmentation import engine

    from ..data.folder import DatasetError
    from ..engine.run_dir import free_run_dir

    recipe, _ = _recipe(args)
    output = Path(args.output)
    if not args.resume:
        output = free_run_dir(output, engine.RUN_FILES, args.overwrite, resume_hint="; --resume continues it")
    result = engine.train(recipe, args.data, output, pretrained=args.pretrained, resume=args.resume,
                          workers=args.workers, seed=args.seed, eval_mode=args.eval_mode, device=args.device,
                          grad_checkpointing=args.grad_checkpointing)
    if "mIoU" in result and result["rank"] == 0:  # the runtime's rank: rank 0 alone reports
        if not result.get("num_images"):
            raise DatasetError(f"--data {args.data}: none of the validation images could be evaluated (first: "
                               f"{result.get('first_skipped')}); the checkpoint is in {output}")
        if not result.get("labelled_pixels"):
            raise DatasetError(f"--data {args.data}: the validation images have no labelled pixel (every label is "
                               f"0 or 255, both ignored): mIoU is not computable; the checkpoint is in {output}")
        print(f"final: mIoU {100 * result['mIoU']:.2f}  aAcc {100 * result['aAcc']:.2f}  "
              f"mAcc {100 * result['mAcc']:.2f}")
        if result.get("skipped"):  # the numbers above leave these out: say so
            print(f"elsa seg train: warning: {result['skipped']} validation images were left out of these metrics "
                  f"(first: {result['first_skipped']})", file=sys.stderr)
    return 0


def run_test(args: argparse.Namespace) -> int:
    from ..dense.segmentation import engine
    from ..dense.segmentation.data import ADE20KDataset
    from ..data.folder import DatasetError
    from ..engine import init_runtime

    recipe, overridden = _recipe(args)
    model, recipe = engine.load_segmentor(args.checkpoint, recipe)
    if overridden:  # test-time settings may still be changed (e.g. --ms-ratios); architecture comes from the file
        recipe, _ = _recipe_over(recipe, args)
    runtime = init_runtime(args.device)  # an explicit --device wins over the rank's default
    model.to(runtime.device)
    dataset = ADE20KDataset(args.data, "validation", num_classes=recipe.num_classes)
    result = engine.evaluate(model, dataset, recipe, mode=args.mode, device=runtime.device, runtime=runtime,
                             progress=True)
    if not runtime.is_main:
        return 0
    total = result["num_images"] + result["skipped"]
    if not result["num_images"]:
        raise DatasetError(f"--data {args.data}: none of the {total} validation images could be used (first: "
                           f"{result['first_skipped']}): no metrics")
    if not result["labelled_pixels"]:
        raise DatasetError(f"--data {args.data}: no labelled pixel in the {result['num_images']} validation images "
                           f"evaluated (every label 0 or 255, both ignored): mIoU is not computable")
    print(engine.format_table(result))
    out = Path(args.json) if args.json else Path(args.checkpoint).with_suffix(f".{args.mode}.json")
    result.update(checkpoint=str(args.checkpoint), recipe=recipe.name)
    engine.write_json(out, result)
    logging.getLogger(__name__).info("wrote %s", out)
    if result["skipped"]:  # the numbers above leave these images out: say so, and fail
        raise DatasetError(f"{result['skipped']} of {total} validation images were left out of the metrics above "
                           f"(first: {result['first_skipped']}); results in {out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..dense.segmentation import engine
    from ..dense.segmentation.ade20k_meta import ADE20K_CLASSES
    from ..dense.segmentation.visualize import add_legend, render_overlay
    from ..engine import resolve_device
    from ..io import atomic_write

    if not Path(args.image).is_file():
        raise FileNotFoundError(f"IMAGE: no such file {args.image}")
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out must be a .png file, got {args.out}")
    recipe, overridden = _recipe(args)
    model, recipe = engine.load_segmentor(args.checkpoint, recipe)
    if overridden:
        recipe, _ = _recipe_over(recipe, args)
    device = resolve_device(args.device)  # default: cuda:0 when available, else cpu
    model.to(device)
    try:
        rgb, pred = engine.predict_image(model, recipe, args.image, mode=args.mode, device=device)
    except OSError as err:  # PIL: not an image
        raise ValueError(f"IMAGE {args.image}: cannot be read as an image ({err})") from err
    names = ADE20K_CLASSES if recipe.num_classes == len(ADE20K_CLASSES) else None
    overlay = render_overlay(rgb, pred, recipe.num_classes, alpha=args.alpha)
    if not args.no_legend:
        overlay = add_legend(overlay, pred, recipe.num_classes, names)
    atomic_write(args.out, lambda tmp: Image.fromarray(overlay).save(tmp, format="PNG"))
    classes, counts = np.unique(pred, return_counts=True)
    top = sorted(zip(counts.tolist(), classes.tolist()), reverse=True)[:5]
    print(f"wrote {args.out}; largest classes: " + ", ".join(
        f"{names[c] if names else c} ({100 * n / pred.size:.1f}%)" for n, c in top))
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    from ..dense.segmentation.recipes import RECIPES

    print("| recipe | backbone | classes | crop | img scale | iterations | batch/GPU | lr | wd | warm-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in sorted(RECIPES.items()):
        print(f"| {name} | {r.backbone} {r.backbone_kwargs or ''} | {r.num_classes} | {r.crop_size[0]}x{r.crop_size[1]}"
              f" | {r.img_scale[0]}x{r.img_scale[1]} | {r.iters} | {r.batch_per_gpu} | {r.lr:g} | {r.weight_decay:g} "
              f"| {r.warmup_iters} |")
    print("Any field can be changed for a run with the flags of `elsa seg train --help` (recipe overrides), e.g. "
          "--iters 2000 --batch-size 1 --crop-size 256 for a short run on a small GPU.")
    return 0


def main(argv=None) -> int:
    """``python -m elsa.cli.seg ...`` (same as ``elsa seg ...``), handy under torchrun."""
    parser = argparse.ArgumentParser(prog="elsa")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["seg", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
