"""`elsa benchmark`: images/s of ELSA models next to their timm baselines on whatever device is present.

Inference (forward, no grad) and a training step (forward + backward + AdamW) per model, in float32 and, with
--amp, bfloat16 autocast. Each ELSA model is followed by its baseline (elsa_swin_tiny -> swin_tiny_patch4_window7_224,
elsa_volo_d1_224 -> volo_d1_224, ...) unless --no-baselines. Example on a laptop:
`elsa benchmark --models elsa_swin_tiny --batch 4 --iters 2`. The same measurement as benchmarks/model_bench.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ._common import add_threads_option, command

_logger = logging.getLogger("elsa.benchmark")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="images/s of ELSA models vs their timm baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["elsa_swin_tiny", "elsa_volo_d1_224"],
                   help="timm model names (default: elsa_swin_tiny elsa_volo_d1_224, each with its baseline)")
    p.add_argument("--no-baselines", action="store_true", help="do not add each ELSA model's timm baseline")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="square input side (default: each model's)")
    p.add_argument("--amp", action="store_true", help="also measure bfloat16 autocast (float32 is always measured)")
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"],
                   help="what to time (default: both)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 5 CUDA, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 CUDA, 3 CPU)")
    p.add_argument("--out", default=None, help="also write every figure and the environment as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=command("benchmark")(run))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import benchmarking as bench
    from ..io import atomic_write_text

    device = bench.resolve_device(args.device)
    cuda = device.startswith("cuda")
    precisions = ["fp32", "bf16"] if args.amp else ["fp32"]
    settings = [bench.BenchSettings(
        device=device, batch=args.batch or (128 if cuda else 8), img_size=args.img_size, precision=prec,
        channels_last=args.channels_last, compile=args.compile,
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
        iters=args.iters if args.iters is not None else (20 if cuda else 3)) for prec in precisions]
    models = bench.expand_models(args.models, with_baselines=not args.no_baselines)
    import timm

    import elsa.models  # noqa: F401
    unknown = [m for m in models if not timm.is_model(m)]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; see `elsa models` or timm.list_models()")

    total = len(models) * len(settings) * len(args.modes)
    with tqdm(total=total, desc="benchmark", unit="run", disable=args.no_progress, file=sys.stderr) as bar:
        def progress(result) -> None:
            bar.set_postfix_str(f"{result.model} {result.mode} {result.images_per_s:.1f} img/s")
            bar.update(1)

        results = bench.run(models, settings, modes=args.modes, on_result=progress)
    env = bench.environment(device)
    print(f"{env['device_name']}, torch {env['torch']}, timm {env['timm']}, triton {env['triton']}, {env['date']}; "
          f"channels_last={args.channels_last}, compile={args.compile}")
    print(bench.format_table(results))
    if args.out:
        doc = bench.to_json(results, device, dict(models=models, modes=args.modes, precisions=precisions))
        atomic_write_text(args.out, json.dumps(doc, indent=1))
        _logger.info("wrote %s", args.out)
    return 1 if any(r.extra.get("error") for r in results) else 0
