"""Model-level benchmark: ELSA-Swin T/S/B vs timm's Swin T/S/B, ELSA-VOLO-D1 vs timm's VOLO-D1.

Images/s of inference (forward, no grad) and of a training step (forward + cross-entropy + backward + AdamW),
in float32 and bfloat16 autocast, with peak GPU memory per measurement (torch.cuda.max_memory_allocated after a
reset), warm-up iterations first and torch.cuda.synchronize around the timed ones. The measuring code is
``elsa.benchmarking`` (also behind ``elsa benchmark``).

    python benchmarks/model_bench.py                                   # CUDA, batch 128 @ 224, fp32 + bf16
    python benchmarks/model_bench.py --compile --channels-last         # settings are stored with the figures
    python benchmarks/model_bench.py --device cpu --batch 8 --iters 7 \\
        --models elsa_swin_tiny elsa_volo_d1_224                       # the committed CPU result

Prints a Markdown table and writes JSON (device name, torch/timm/triton versions, date, settings, every figure)
to benchmarks/results/model_bench_<device>.json unless --json says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from elsa import benchmarking as bench
from elsa.io import atomic_write

DEFAULT_MODELS = ["elsa_swin_tiny", "elsa_swin_small", "elsa_swin_base", "elsa_volo_d1_224"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="ELSA (or any timm) models; each ELSA model brings its baseline")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=None, help="default: each model's (224)")
    parser.add_argument("--precisions", nargs="+", choices=bench.PRECISIONS, default=None,
                        help="default: fp32 bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--modes", nargs="+", choices=bench.MODES, default=list(bench.MODES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (default: eager)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 CUDA, 1 CPU")
    parser.add_argument("--iters", type=int, default=None, help="default: 20 CUDA, 3 CPU")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each ELSA model and its baseline turn about, from median step times "
                             "(default: on for CPU, whose load drifts; off for CUDA)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/model_bench_<device>.json")
    args = parser.parse_args(argv)

    device = bench.resolve_device(args.device)
    cuda = device.startswith("cuda")
    precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
    settings = [bench.BenchSettings(device=device, batch=args.batch, img_size=args.img_size, precision=p,
                                    channels_last=args.channels_last, compile=args.compile,
                                    warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
                                    iters=args.iters if args.iters is not None else (20 if cuda else 3))
                for p in precisions]
    models = bench.expand_models(args.models)

    def progress(r: bench.BenchResult) -> None:
        print(f"  {r.model:32s} {r.mode:5s} {r.settings['precision']}: {r.images_per_s:8.1f} images/s",
              file=sys.stderr, flush=True)

    interleave = not cuda if args.interleave is None else args.interleave
    runner = bench.run_interleaved if interleave else bench.run
    load_before = os.getloadavg()  # other processes on the machine: the figures depend on them
    results = runner(models, settings, modes=args.modes, on_result=progress)
    env = bench.environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | timm {env['timm']} | triton {env['triton']} | {env['date']}")
    print(f"batch {args.batch}, input {args.img_size or 'model default (224)'}, channels_last={args.channels_last}, "
          f"compile={args.compile}, warmup/iters={settings[0].warmup}/{settings[0].iters}")
    print(bench.format_table(results))
    out = Path(args.json) if args.json else Path(__file__).parent / "results" / f"model_bench_{bench.device_slug(device)}.json"
    doc = bench.to_json(results, device, dict(models=models, modes=args.modes, precisions=precisions,
                                              interleaved=interleave, threads=torch.get_num_threads(),
                                              loadavg=dict(before=[round(x, 2) for x in load_before],
                                                           after=[round(x, 2) for x in os.getloadavg()]),
                                              argv=sys.argv[1:] if argv is None else list(argv)))
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    print(f"wrote {out}")
    return 1 if any(r.extra.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
