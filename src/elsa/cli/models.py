"""``elsa models``: the registered ELSA models with their size, cost and official accuracy."""
from __future__ import annotations

import argparse
import json
import sys

import timm
import torch

from ._common import command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered ELSA models (params, GFLOPs, official top-1)",
                       description="List the ELSA models registered with timm: parameters (1000 classes unless the "
                                   "model's default differs), GFLOPs (multiply-accumulates, as papers count) at the "
                                   "default input size, and the official ImageNet top-1 where one was published.")
    p.add_argument("pattern", nargs="?", default="elsa_*", help="timm name filter (default: elsa_*)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=command("models")(run))


def describe(name: str, flops: bool = True) -> dict:
    """Params, GFLOPs and official top-1 of one registered model, computed on the meta device (no memory)."""
    from ..ops.flops import count_flops

    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))
    official = _official_top1(name)
    row = dict(model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               input_size=size[-1], official_top1=official)
    if flops:
        row["gflops"] = round(count_flops(model, (1, *size), device="meta") / 1e9, 2)
    return row


def _official_top1(name: str):
    from ..models import elsa_swin

    entry = elsa_swin.OFFICIAL.get(name)
    return entry["top1"] if entry else None


def run(args: argparse.Namespace) -> int:
    import elsa  # noqa: F401  (registers the models)

    names = timm.list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}")
    if args.json and sys.stderr.isatty():
        print(f"computing {len(names)} model(s)...", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([describe(n, flops=not args.no_flops) for n in names], indent=2))
        return 0
    # Rows are printed as they are computed (the FLOP count of the largest models takes seconds each), so the
    # table fills in progressively instead of appearing after half a minute.
    header = f"{'model':<24} {'params (M)':>10} {'size':>5} {'GFLOPs':>8} {'official top-1':>15}"
    print(header)
    print("-" * len(header), flush=True)
    for name in names:
        r = describe(name, flops=not args.no_flops)
        gflops = f"{r['gflops']:.2f}" if "gflops" in r else "-"
        top1 = f"{r['official_top1']:.1f}" if r["official_top1"] is not None else "-"
        print(f"{r['model']:<24} {r['params_m']:>10.2f} {r['input_size']:>5} {gflops:>8} {top1:>15}", flush=True)
    return 0
