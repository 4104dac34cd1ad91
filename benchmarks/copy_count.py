"""Layout copies in an ELSA-Swin-T forward on CPU: the number and time of ``aten::copy_`` calls (torch.profiler),
next to timm's Swin-T measured the same way, and the copies the model's code asks for (``clone``, ``contiguous``
and reshape copies, counted at the dispatcher). The profiler's count also holds copies made inside kernels: CPU
``addmm`` copies the broadcast bias into its output first, once per Linear with a bias (59 in ELSA-Swin-T).

Batch 8 at 224, float32, eval, no grad, eager, after one warm-up forward. ``--label`` names the code measured
(e.g. ``before`` / ``after`` a change); each label's figures are kept in the JSON file, so the same script run on
two checkouts (PYTHONPATH=<checkout>/src) gives the comparison.

    python benchmarks/copy_count.py --label after [--json benchmarks/results/copy_count_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import elsa  # noqa: F401 - registers the ELSA models

MODELS = ("elsa_swin_tiny", "swin_tiny_patch4_window7_224")


class _CopyOps(TorchDispatchMode):
    """Counts the copying ATen ops the model's Python code reaches (reshape and contiguous decompose to these)."""

    COPIES = ("clone", "copy_", "_to_copy")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.COPIES
        return func(*args, **(kwargs or {}))


def profile(name: str, batch: int) -> dict:
    model = timm.create_model(name).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
        with _CopyOps() as dispatched:
            model(x)
    events = {e.key: e for e in prof.key_averages()}
    total_us = sum(e.self_cpu_time_total for e in events.values())
    copy = events.get("aten::copy_")
    return dict(copy_calls=copy.count if copy else 0, layout_copies=dispatched.count,
                copy_ms=round(copy.self_cpu_time_total / 1000, 1) if copy else 0.0,
                copy_share=round(copy.self_cpu_time_total / total_us, 3) if copy else 0.0,
                forward_ms=round(total_us / 1000, 1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "copy_count_cpu.json"))
    args = parser.parse_args(argv)
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() else dict(benchmark="copy_count", results={})
    doc["results"][args.label] = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                                      threads=torch.get_num_threads(), batch=args.batch,
                                      models={m: profile(m, args.batch) for m in MODELS})
    for model, r in doc["results"][args.label]["models"].items():
        print(f"{args.label:>8} {model:<30} aten::copy_ {r['copy_calls']:>4} calls, {r['copy_ms']:>8.1f} ms "
              f"({100 * r['copy_share']:.1f}% of the forward's {r['forward_ms']:.0f} ms CPU time); "
              f"{r['layout_copies']} copies asked for by the model's code")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


if __name__ == "__main__":
    main()
