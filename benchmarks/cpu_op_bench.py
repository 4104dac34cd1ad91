"""CPU operator benchmark: the compiled ``cpp`` kernel vs ``native`` vs the unfold ``reference``, at ELSA-Swin-T's
stage-1 shape, as the ELSA layer calls each.

Shape: batch 8, 96 channels in 3 heads (C = 32 per head), 56x56, K = 7, additive ghost only (lam = 0, gamma = 1, as
ELSA-Swin), float32, softmax over the K*K logits included (the layer's call: ``elsa_softmax_aggregate``):

- ``cpp``: the head-aware entry (``num_heads=3``) on channels-last v and logits and one (G, C, K, K) ghost, as the
  layer now calls it; the softmax is fused.
- ``native`` and ``reference``: the flat entry on (B*G, C, H, W) maps and a per-sample ghost, as the layer called
  them before (the reshaping copies it made are not counted); softmax, then aggregation.

Measured in one process, turn about (one call of each backend per round, median over rounds): forward (no grad),
forward + backward (gradients of v, the logits and the ghost), and the peak memory one forward + backward adds over
what the process holds before it (VmHWM after a reset through /proc/self/clear_refs, Linux).

    python benchmarks/cpu_op_bench.py [--batch 8] [--rounds 15] [--json benchmarks/results/cpu_op_bench.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from elsa.io import atomic_write
from elsa.ops import elsa_softmax_aggregate

HEADS, CHANNELS, SIDE, K = 3, 96, 56, 7
BACKENDS = ("reference", "native", "cpp")


def make_inputs(backend: str, batch: int) -> tuple:
    """(v, logits, ghost, grad, call kwargs) laid out as the layer hands them to ``backend``."""
    g = torch.Generator().manual_seed(0)
    c = CHANNELS // HEADS
    v = torch.randn(batch, SIDE, SIDE, CHANNELS, generator=g)
    logits = torch.randn(batch, SIDE, SIDE, HEADS * K * K, generator=g)
    ghost = torch.randn(HEADS, c, K, K, generator=g) * 0.02
    grad = torch.randn(batch, SIDE, SIDE, CHANNELS, generator=g)
    if backend == "cpp":  # channels-last views, the ghost once for the batch
        return (v.permute(0, 3, 1, 2).requires_grad_(), logits.permute(0, 3, 1, 2).requires_grad_(),
                ghost.requires_grad_(), grad.permute(0, 3, 1, 2), dict(num_heads=HEADS))
    n = batch * HEADS
    flat = lambda t, ch: t.permute(0, 3, 1, 2).reshape(n, ch, SIDE, SIDE).contiguous()  # noqa: E731
    return (flat(v, c).requires_grad_(), flat(logits, K * K).requires_grad_(),
            ghost.expand(batch, -1, -1, -1, -1).reshape(n, c, K, K).contiguous().requires_grad_(),
            flat(grad, c), {})


def forward(backend: str, inputs) -> None:
    v, logits, ghost, _, kw = inputs
    with torch.no_grad():
        elsa_softmax_aggregate(v, logits, None, ghost, kernel_size=K, backend=backend, **kw)


def forward_backward(backend: str, inputs) -> None:
    v, logits, ghost, grad, kw = inputs
    out = elsa_softmax_aggregate(v, logits, None, ghost, kernel_size=K, backend=backend, **kw)
    torch.autograd.grad(out, (v, logits, ghost), grad)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_added_mib(backend: str, inputs) -> float:
    """Peak resident memory (MiB) one forward + backward adds over what the process holds before it."""
    forward_backward(backend, inputs)  # warm-up: one-time allocations are not the op's
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    forward_backward(backend, inputs)
    return _status_mib("VmHWM") - before


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reference-rounds", type=int, default=3, help="the unfold reference is slow")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "cpu_op_bench.json"))
    args = parser.parse_args(argv)

    load_before = os.getloadavg()  # other processes on the machine: the figures depend on them
    inputs = {b: make_inputs(b, args.batch) for b in BACKENDS}
    memory = {b: peak_added_mib(b, inputs[b]) for b in BACKENDS}
    times = {(b, fn.__name__): [] for b in BACKENDS for fn in (forward, forward_backward)}
    for r in range(args.rounds):
        for b in BACKENDS:
            if b == "reference" and r >= args.reference_rounds:
                continue
            for fn in (forward, forward_backward):
                t0 = time.perf_counter()
                fn(b, inputs[b])
                times[(b, fn.__name__)].append(time.perf_counter() - t0)
    rows = {b: dict(fwd_ms=round(1000 * statistics.median(times[(b, "forward")]), 2),
                    fwd_bwd_ms=round(1000 * statistics.median(times[(b, "forward_backward")]), 2),
                    peak_added_mib=round(memory[b], 1)) for b in BACKENDS}
    speedup = {f"cpp_vs_{b}": dict(fwd=round(rows[b]["fwd_ms"] / rows["cpp"]["fwd_ms"], 2),
                                   fwd_bwd=round(rows[b]["fwd_bwd_ms"] / rows["cpp"]["fwd_bwd_ms"], 2))
               for b in ("native", "reference")}
    result = dict(
        benchmark="cpu_op_bench", date=datetime.date.today().isoformat(), device=cpu_name(),
        threads=torch.get_num_threads(), torch=torch.__version__,
        shape=dict(batch=args.batch, heads=HEADS, channels=CHANNELS, side=SIDE, kernel_size=K, ghost="add",
                   softmax=True, dtype="float32"),
        rounds=args.rounds, reference_rounds=args.reference_rounds,
        loadavg=dict(before=[round(x, 2) for x in load_before], after=[round(x, 2) for x in os.getloadavg()]),
        results=rows, speedup=speedup)
    print(f"{'backend':<10} {'fwd (ms)':>9} {'fwd+bwd (ms)':>13} {'peak added (MiB)':>17}")
    for name, r in rows.items():
        print(f"{name:<10} {r['fwd_ms']:>9.1f} {r['fwd_bwd_ms']:>13.1f} {r['peak_added_mib']:>17.1f}")
    for name, s in speedup.items():
        print(f"{name}: forward {s['fwd']}x, forward+backward {s['fwd_bwd']}x")
    atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result


if __name__ == "__main__":
    main()
