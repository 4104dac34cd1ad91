"""``elsa det train|test|predict``: COCO detection and instance segmentation with ELSA-Swin Mask R-CNN and
Cascade Mask R-CNN (the official ELSA-Swin COCO recipes)."""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any, Dict

from ._common import (add_threads_option, command, int_list, int_pair, json_object, non_negative_int,
                      positive_float, positive_int, probability, recipe_overrides)

_logger = logging.getLogger("elsa.det")


# flag (argparse dest) -> DetRecipe field; switches map to (field, value)
RECIPE_FLAGS = {
    "num_classes": "num_classes", "backbone_kwargs": "backbone_kwargs", "iters": "max_iters",
    "batch_size": "batch_size", "workers": "workers", "lr": "lr", "train_scales": "train_scales",
    "test_size": "test_size", "amp_dtype": "amp_dtype", "no_amp": ("amp", False),
    "grad_checkpointing": ("grad_checkpointing", True),
}


def _recipe(args: argparse.Namespace, meta_recipe: Dict[str, Any] | None = None):
    """The named recipe (or the checkpoint's, for test/predict without --recipe) with the flags applied."""
    from elsa.dense.recipes_det import DetRecipe, get_recipe

    overrides = recipe_overrides(args, RECIPE_FLAGS)
    if meta_recipe is not None and args.recipe is None:
        try:
            return DetRecipe.from_dict(meta_recipe).replace(**overrides)
        except (TypeError, ValueError) as err:  # another command's recipe: unknown fields
            from elsa.checkpoint import CheckpointError

            raise CheckpointError(f"--checkpoint file {str(args.checkpoint)!r} holds recipe "
                                  f"{meta_recipe.get('name', '?')!r}, which is not a detection recipe (a checkpoint "
                                  f"of `elsa seg` or `elsa train`?)") from err
    return get_recipe(args.recipe or "mask_rcnn_elsa_swin_tiny_1x", **overrides)


def _print_metrics(metrics: Dict[str, Dict[str, Any]]) -> None:
    for iou_type, stats in metrics.items():
        print(f"== {iou_type} ==")
        print(stats.get("table", ""))
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    print("| type | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for iou_type, stats in metrics.items():
        print(f"| {iou_type} | " + " | ".join(_ap(stats[k]) for k in keys) + " |")
    if any(stats[k] < 0 for stats in metrics.values() for k in keys):
        print("n/a: no ground-truth object of that size (COCO reports -1)")


def _ap(value: float) -> str:
    """An AP in percent; COCO's -1 ("no object of that size / category") as n/a."""
    return "n/a" if value < 0 else f"{100 * value:.1f}"


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from elsa.dense.detection import build_detector
    from elsa.dense.detection.data import build_datasets
    from elsa.dense.detection.engine import RUN_FILES, train
    from elsa.engine.run_dir import free_run_dir

    recipe = _recipe(args)
    random.seed(args.seed)  # the augmentation draws from Python's RNG
    torch.manual_seed(args.seed)
    splits = ("train", "val") if args.eval else ("train",)
    datasets = build_datasets(args.data, recipe, splits=splits,
                              ann_files={k: v for k, v in (("train", args.train_ann), ("val", args.val_ann)) if v},
                              img_dirs={k: v for k, v in (("train", args.train_images), ("val", args.val_images)) if v})
    n_classes = len(datasets["train"].classes)
    if n_classes != recipe.num_classes:
        _logger.info("dataset has %d categories; num_classes %d -> %d", n_classes, recipe.num_classes, n_classes)
        recipe = recipe.replace(num_classes=n_classes)
    model = build_detector(recipe)
    if args.pretrained:
        report = model.backbone.body.load_pretrained(args.pretrained)
        _logger.info("pretrained backbone: %d tensors missing, %d unused", len(report.missing), len(report.unexpected))
    output = Path(args.output or f"output/det/{recipe.name}")
    if not args.resume:
        output = free_run_dir(output, RUN_FILES, args.overwrite, resume_hint="; --resume continues it")
    summary = train(model, recipe, datasets["train"], output, val_set=datasets.get("val"), resume=args.resume,
                    eval_interval=args.eval_interval, progress=not args.no_progress)
    if summary["rank"] != 0:  # the runtime's rank: rank 0 alone reports
        return 0
    stats = {"bbox_train": dict(datasets["train"].stats)}
    print(f"trained {summary['iterations']} iterations ({summary['epochs']} epochs) in {summary['seconds']:.0f}s; "
          f"checkpoint {summary['checkpoint']}; data cleaning: {stats['bbox_train']}")
    if summary["metrics"]:
        _print_metrics(summary["metrics"])
    return 0


def _load_model(args: argparse.Namespace):
    """(model, recipe, meta) from ``--checkpoint``, read once."""
    from elsa.checkpoint import read_checkpoint
    from elsa.dense.detection import build_detector
    from elsa.dense.detection.engine import load_model_checkpoint, read_detector_checkpoint

    state = read_checkpoint(args.checkpoint, "--checkpoint file")
    stored = state.get("recipe") if isinstance(state, dict) else None
    recipe = _recipe(args, stored if isinstance(stored, dict) else None)
    _, meta = read_detector_checkpoint(args.checkpoint, state)
    if meta.get("classes") and args.num_classes is None:
        recipe = recipe.replace(num_classes=len(meta["classes"]))
    model = build_detector(recipe)
    load_model_checkpoint(model, args.checkpoint, state)
    return model, recipe, meta


def cmd_test(args: argparse.Namespace) -> int:
    from elsa.dense.detection.data import CocoInstances, coco_paths
    from elsa.data.folder import DatasetError
    from elsa.dense.detection.engine import predict_dataset
    from elsa.engine import init_runtime
    from elsa.io import atomic_write_text

    runtime = init_runtime(args.device)  # an explicit --device wins over the rank's default
    model, recipe, _ = _load_model(args)
    model.to(runtime.device)
    ann, img = coco_paths(args.data, args.split) if not (args.ann and args.images) else (args.ann, args.images)
    dataset = CocoInstances(args.ann or ann, args.images or img, train=False)
    evaluator = predict_dataset(model, dataset, progress=not args.no_progress, runtime=runtime)
    metrics = evaluator.summarize()
    if runtime.is_main:
        _print_metrics(metrics)
        out = Path(args.out or Path(args.checkpoint).with_suffix(".metrics.json"))
        atomic_write_text(out, json.dumps(metrics, indent=2))
        print(f"metrics written to {out}")
        if evaluator.unreadable:  # the numbers above leave these images out: say so, and fail
            raise DatasetError(f"{evaluator.unreadable} of {len(dataset)} images could not be read and were left "
                               f"out of the metrics above (named in the warnings); results in {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Each IMAGE -> a PNG with its detections; an unreadable image is reported and the others still run (exit 2
    at the end if any failed)."""
    import numpy as np
    import torch
    from PIL import Image

    from elsa.data.folder import SAMPLE_ERRORS
    from elsa.data.image import open_rgb
    from elsa.dense.detection.draw import draw_detections
    from elsa.engine import resolve_device
    from elsa.io import atomic_write, atomic_write_text

    several = len(args.image) > 1
    out = Path(args.out)
    if several and out.suffix.lower() == ".png":
        raise ValueError(f"--out {out}: with {len(args.image)} images, give a folder (one PNG per image)")
    if not several and out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: expected a .png file")
    model, recipe, meta = _load_model(args)
    device = resolve_device(args.device)
    model.to(device).eval()
    classes = meta.get("classes") or [str(i) for i in range(1, recipe.num_classes + 1)]
    records: Dict[str, Any] = {}
    failed = []
    for path in args.image:
        try:
            arr = np.asarray(open_rgb(path)).copy()
        except FileNotFoundError:
            failed.append(path)
            print(f"elsa det predict: error: IMAGE {path}: file not found", file=sys.stderr)
            continue
        except SAMPLE_ERRORS as err:
            failed.append(path)
            print(f"elsa det predict: error: IMAGE {path}: cannot be read as an image ({err})", file=sys.stderr)
            continue
        image = torch.from_numpy(arr).permute(2, 0, 1)
        with torch.no_grad():
            pred = model([image.float().div(255).to(device)])[0]
        keep = pred["scores"] >= args.score_thr
        boxes, labels, scores = pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(), pred["scores"][keep].cpu()
        names = [f"{classes[int(l) - 1]} {float(s):.2f}" for l, s in zip(labels, scores)]
        masks = pred["masks"][keep][:, 0].cpu() >= recipe.mask_thresh if "masks" in pred else None
        drawing = draw_detections(image, boxes, labels, names, masks)
        target = out / f"{Path(path).stem}.png" if several else out
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: Image.fromarray(drawing).save(tmp, format="PNG"))
        if several:
            print(f"== {path}")
        for n, b in zip(names, boxes.tolist()):
            print(f"{n}\t" + " ".join(f"{v:.1f}" for v in b))
        print(f"{len(names)} detections (score >= {args.score_thr}) drawn to {target}")
        records[str(path)] = [{"label": classes[int(l) - 1], "score": float(s), "box_xyxy": [float(v) for v in b]}
                              for l, s, b in zip(labels, scores, boxes)]
    if args.json and records:
        atomic_write_text(Path(args.json), json.dumps(records if several else next(iter(records.values())),
                                                      indent=2))
    if failed:
        print(f"elsa det predict: error: {len(failed)} of {len(args.image)} images could not be read "
              f"(first: {failed[0]})", file=sys.stderr)
        return 2
    return 0


def _common(p: argparse.ArgumentParser, recipe_default: str | None) -> None:
    p.add_argument("--recipe", default=recipe_default,
                   help="recipe name (see `elsa det recipes`); test/predict default: the one saved in the checkpoint")
    p.add_argument("--num-classes", type=positive_int, default=None, help="override the number of classes")
    p.add_argument("--backbone-kwargs", type=json_object, default=None,
                   help="JSON overrides of the backbone architecture (tests)")
    p.add_argument("--test-size", type=int_pair, default=None, help="SHORT,LONG test resize (default: recipe's "
                                                                     "800,1333)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_option(p)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    det = subparsers.add_parser("det", help="COCO detection / instance segmentation (Mask R-CNN, Cascade)",
                                description=__doc__)
    sub = det.add_subparsers(dest="det_command", metavar="ACTION")

    p = sub.add_parser("train", help="train a detector on a COCO-format dataset")
    _common(p, "mask_rcnn_elsa_swin_tiny_1x")
    p.add_argument("--data", required=True,
                   help="ROOT with annotations/instances_{train,val}2017.json and {train,val}2017/")
    p.add_argument("--train-ann", default=None, help="training annotation JSON (overrides the layout under --data)")
    p.add_argument("--train-images", default=None, help="training image folder (overrides the layout under --data)")
    p.add_argument("--val-ann", default=None, help="validation annotation JSON (overrides the layout under --data)")
    p.add_argument("--val-images", default=None, help="validation image folder (overrides the layout under --data)")
    p.add_argument("--pretrained", default=None, help="classification (or detection) checkpoint for the backbone")
    p.add_argument("--output", default=None, help="output folder (default output/det/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pth")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUTPUT (default: a folder holding a run gives way to OUTPUT-1, ...)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="evaluate on val at the end")
    p.add_argument("--eval-interval", type=non_negative_int, default=0, help="also evaluate every N epochs "
                                                                              "(default 0: at the end only)")
    p.add_argument("--iters", type=positive_int, default=None, help="total iterations instead of the recipe's epochs")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per GPU/process (official: 2)")
    p.add_argument("--workers", type=non_negative_int, default=None, help="data-loading processes per GPU/process "
                                                                           "(recipe default)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (official 1e-4 for 16 images)")
    p.add_argument("--train-scales", type=int_list, default=None,
                   help="comma-separated short sides for training resize")
    p.add_argument("--no-amp", action="store_true", help="float32 training on CUDA (default: fp16 autocast)")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=None,
                   help="turn autocast on with this dtype (default float16, CUDA only; bfloat16 also on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute backbone blocks to save memory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=command("det train")(cmd_train))

    p = sub.add_parser("test", help="COCO box/mask AP of a checkpoint (ours, or an official mmdet one + --recipe)")
    _common(p, None)
    p.add_argument("--checkpoint", required=True, help="an `elsa det train` checkpoint, or an official mmdet one "
                                                       "with --recipe")
    p.add_argument("--data", required=True, help="ROOT with annotations/instances_SPLIT2017.json and SPLIT2017/")
    p.add_argument("--split", default="val", help="which split under --data (default val)")
    p.add_argument("--ann", default=None, help="annotation JSON (overrides the layout under --data)")
    p.add_argument("--images", default=None, help="image folder (overrides the layout under --data)")
    p.add_argument("--out", default=None, help="metrics JSON (default: CHECKPOINT.metrics.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the rank's GPU, else cpu)")
    p.set_defaults(func=command("det test")(cmd_test))

    p = sub.add_parser("predict", help="draw detections and masks over one image (PNG)")
    _common(p, None)
    p.add_argument("image", nargs="+", metavar="IMAGE", help="image file(s); an unreadable one is reported and "
                                                              "skipped (exit code 2 at the end)")
    p.add_argument("--checkpoint", required=True, help="an `elsa det train` checkpoint, or an official mmdet one "
                                                       "with --recipe")
    p.add_argument("--out", required=True, help="output PNG (one IMAGE) or folder (several: FOLDER/NAME.png)")
    p.add_argument("--json", default=None, help="also write the detections as JSON (several images: by file)")
    p.add_argument("--score-thr", type=probability, default=0.3, help="draw detections scoring at least this "
                                                                      "(0..1, default 0.3)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=command("det predict")(cmd_predict))

    p = sub.add_parser("recipes", help="list the detection recipes")
    p.set_defaults(func=command("det recipes")(cmd_recipes))
    det.set_defaults(func=lambda a: (det.print_help(), 2)[1])


def cmd_recipes(args: argparse.Namespace) -> int:
    from elsa.dense.recipes_det import RECIPES

    print("| recipe | detector | backbone | drop-path | epochs | lr steps | lr | wd |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in sorted(RECIPES.items()):
        backbone = r.backbone + (" (small: " + json.dumps(r.backbone_kwargs) + ")" if r.backbone_kwargs else "")
        print(f"| {name} | {r.arch} | {backbone} | {r.drop_path_rate} | {r.epochs} | {list(r.lr_steps)} | "
              f"{r.lr:g} | {r.weight_decay:g} |")
    return 0


def main(argv=None) -> int:
    """``python -m elsa.cli.det ACTION ...``: the same as ``elsa det ACTION ...`` (used under torchrun)."""
    parser = argparse.ArgumentParser(prog="elsa")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["det", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
