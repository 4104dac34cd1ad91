"""Params and FLOPs (MACs, the papers' convention) of ELSA-VOLO D1-D5 next to timm's VOLO and the papers' figures.

Counts on the meta device (no compute, seconds): ``python benchmarks/elsa_volo_flops.py``; writes
benchmarks/results/elsa_volo_flops.json and prints a Markdown table. ``--sweep`` adds the settings search (kernel
size x group width x heads) behind the choice in ``elsa.models.elsa_volo``.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import timm
import torch

import elsa.models.elsa_volo as ev
from elsa.io import atomic_write
from elsa.ops.flops import count_flops

# VOLO paper (arXiv 2106.13112, Table 1 / README): params (M) and GFLOPs at 224.
VOLO_PAPER = {"d1": (27, 6.8), "d2": (59, 14.1), "d3": (86, 20.6), "d4": (193, 43.8), "d5": (296, 69.0)}
VARIANTS = [("d1", 224), ("d1", 384), ("d2", 224), ("d2", 384), ("d3", 224), ("d3", 448),
            ("d4", 224), ("d4", 448), ("d5", 224), ("d5", 448), ("d5", 512)]


def _measure(name: str, size: int, **kwargs) -> tuple[float, float]:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return params, count_flops(model, (1, 3, size, size)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="also the kernel/group-width/heads search")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "elsa_volo_flops.json"))
    args = parser.parse_args()
    rows = []
    for d, size in VARIANTS:
        p, f = _measure(f"elsa_volo_{d}_{size}", size)
        vp, vf = _measure(f"volo_{d}_{size}", size)
        paper = ev.PAPER.get(f"elsa_volo_{d}_{size}", {}).get("gflops")
        rows.append(dict(model=f"elsa_volo_{d}_{size}", params_m=round(p, 2), gflops=round(f, 2),
                         paper_gflops=paper, volo_params_m=round(vp, 2), volo_gflops=round(vf, 2),
                         volo_paper_params_m=VOLO_PAPER[d][0] if size == 224 else None,
                         volo_paper_gflops=VOLO_PAPER[d][1] if size == 224 else None))
    print("| model | params (M) | GFLOPs | paper GFLOPs | timm VOLO params (M) | timm VOLO GFLOPs | VOLO paper @224 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vpaper = f"{r['volo_paper_params_m']} M / {r['volo_paper_gflops']} G" if r["volo_paper_gflops"] else ""
        print(f"| {r['model']} | {r['params_m']} | {r['gflops']} | {r['paper_gflops'] or ''} | "
              f"{r['volo_params_m']} | {r['volo_gflops']} | {vpaper} |")
    sweep = []
    if args.sweep:
        for heads_mult in (0.5, 1, 2):
            for gw in (4, 8, 16):
                for k in (3, 5, 7, 9, 11, 13):
                    entry = dict(heads_mult=heads_mult, group_width=gw, kernel=k)
                    for d, size, target in (("d1", 224, 8.0), ("d5", 512, 437.0)):
                        heads = int(ev.MODEL_ARGS[d]["num_heads"][0] * heads_mult)
                        p, f = _measure(f"elsa_volo_{d}_{size}", size, elsa_kernel=k, elsa_group_width=gw,
                                        elsa_heads=heads)
                        entry[d] = dict(params_m=round(p, 2), gflops=round(f, 2), err_pct=round(100 * (f / target - 1), 1))
                    entry["max_abs_err_pct"] = max(abs(entry[d]["err_pct"]) for d in ("d1", "d5"))
                    sweep.append(entry)
                    print(entry)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  torch=torch.__version__, timm=timm.__version__, settings=ev.ELSA_VOLO_SETTINGS,
                  convention="MACs (papers' 'FLOPs'), elsa.ops.flops.count_flops, batch 1", rows=rows, sweep=sweep)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))


if __name__ == "__main__":
    main()
