"""Export and deploy figures for the README: torch.compile at a first and a second input size, export time with both
ONNX exporters and torch.export, onnxruntime vs eager (max difference, speed on CPU at batch 1 and 8).

    python benchmarks/export_bench.py                      # ELSA-Swin-T, writes benchmarks/results/export_bench.json
    python benchmarks/export_bench.py --model elsa_swin_pico --size 32 --second-size 48x40   # a quick run

One command, about 10 minutes on a quiet 2-core CPU for ELSA-Swin-T (inductor compiles dominate). Timings are
wall-clock and depend on the machine's load: the JSON records the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import elsa  # noqa: F401  (registers the models)
from elsa.tools.export import export_model


def _size(text: str) -> tuple:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def _time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_compile(model, sizes, batch: int) -> dict:
    """First-call time of torch.compile (inductor, fullgraph) at each size in turn; the second is the recompile
    with dynamic spatial sizes that used to stall."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = {}
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(batch, 3, h, w)
            start = time.perf_counter()
            got = compiled(x)
            seconds = time.perf_counter() - start
            out[f"{h}x{w}"] = dict(first_call_s=round(seconds, 1),
                                   max_abs_diff=float((got - model(x)).abs().max()))
    return out


def bench_onnxruntime(path: str, model, size: tuple, batches, repeats: int) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    out = {}
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 3, *size)
            feed = {"x": x.numpy()}
            ort_s = _time(lambda: session.run(None, feed), repeats)
            eager_s = _time(lambda: model(x), repeats)
            diff = float((torch.from_numpy(session.run(None, feed)[0]) - model(x)).abs().max())
            out[f"batch{b}"] = dict(onnxruntime_ms=round(ort_s * 1e3, 1), eager_ms=round(eager_s * 1e3, 1),
                                    speedup=round(eager_s / ort_s, 2), max_abs_diff=diff)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="elsa_swin_tiny")
    p.add_argument("--size", type=_size, default=(224, 224), help="first size, HxW or S (default 224)")
    p.add_argument("--second-size", type=_size, default=(256, 320), help="second size (default 256x320)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="onnxruntime vs eager batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["compile", "onnx-dynamo", "onnx-torchscript", "pt2"])
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "export_bench.json"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    result = dict(model=args.model, size=list(args.size), second_size=list(args.second_size),
                  machine=dict(platform=platform.platform(), processor=platform.processor(),
                               cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                               loadavg_before=os.getloadavg()),
                  torch=torch.__version__, timm=timm.__version__, python=sys.version.split()[0],
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if "compile" not in args.skip:
        result["compile"] = bench_compile(model, [args.size, args.second_size], batch=1)
        print("compile", result["compile"], flush=True)
    exports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, exporter in (("onnx", "torchscript"), ("onnx", "dynamo"), ("pt2", "dynamo")):
            key = "pt2" if fmt == "pt2" else f"onnx-{exporter}"
            if key in args.skip:
                continue
            report = export_model(model, Path(tmp) / f"{key}.{fmt}", fmt, img_size=args.size[0], batch=2,
                                  exporter=exporter)
            exports[key] = dict(export_s=report.seconds, max_abs_diff_batch3=report.max_abs_diff)
            print(key, exports[key], flush=True)
            if fmt == "onnx" and "onnxruntime" not in result:
                result["onnxruntime"] = dict(file=key, **bench_onnxruntime(
                    report.path, model, (args.size[0], args.size[0]), args.batches, args.repeats))
                print("onnxruntime", result["onnxruntime"], flush=True)
    result["export"] = exports
    result["machine"]["loadavg_after"] = os.getloadavg()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
