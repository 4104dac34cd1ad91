"""Training-step cost of Mask R-CNN with the ELSA-Swin-T backbone vs the same detector with timm's Swin-T.

Both detectors are built by ``elsa.dense.detection.build_detector`` from the official 1x recipe (FPN 256, RPN,
shared-2fc box head, 4-conv mask head, 80 classes), so only the backbone differs. One step = forward with
losses + backward + AdamW step, run by the engine of ``elsa det train`` (``elsa.engine.Trainer``), on a batch
of synthetic images (default 2 x 800x1333, the official per-GPU batch and test size) with 8 random objects each
(boxes + rectangular masks). fp16 autocast with loss scaling on CUDA (the official setting), float32 on CPU.

Measured per backbone: median step time over ``--iters`` steps after ``--warmup`` steps, images/s, and peak
memory: CUDA max_memory_allocated on GPU; on CPU (each backbone in its own process) the peak RSS and its growth
during the steps (a rough figure).

    python benchmarks/det_bench.py                                # CUDA when present, 800x1333, 20 steps
    python benchmarks/det_bench.py --device cpu --iters 1 --height 320 --width 512   # quick CPU run

Writes JSON to benchmarks/results/det_bench_<device>.json unless --json says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import elsa  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from elsa.dense.detection import build_detector  # noqa: E402
from elsa.dense.recipes_det import get_recipe  # noqa: E402
from elsa.engine import Hook, Runtime, StepOutput, Trainer, TrainState, amp_dtype  # noqa: E402

BACKBONES = {"elsa_swin_tiny": "elsa_swin_tiny", "swin_tiny": "timm:swin_tiny_patch4_window7_224"}


def synthetic_batch(batch: int, h: int, w: int, objects: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        xy = torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(objects, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 81, (objects,), generator=g).to(device),
                        "masks": masks.to(device)})
    return images, targets


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StepTimes(Hook):
    """Wall time of each step after the warm-up (CUDA synchronised), and the peak memory from there on."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.times, self.t0 = warmup, device, [], 0.0

    def before_train(self, trainer: Trainer) -> None:
        if self.device.type == "cuda" and self.warmup == 0:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if trainer.state.iteration > self.warmup:
            self.times.append(now - self.t0)
        elif trainer.state.iteration == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()


def bench_one(name: str, args, device: torch.device) -> dict:
    recipe = get_recipe("mask_rcnn_elsa_swin_tiny_1x", backbone=BACKBONES[name])
    pad_h, pad_w = -(-args.height // 32) * 32, -(-args.width // 32) * 32
    torch.manual_seed(0)
    model = build_detector(recipe, img_size=(pad_h, pad_w)).to(device).train()
    params = sum(p.numel() for p in model.backbone.body.parameters())
    # the training step of `elsa det train`: the engine's runtime (fp16 autocast + loss scaling on CUDA) and loop
    runtime = Runtime(device=device, amp_dtype=amp_dtype(True, device, "float16", cpu=False))
    state = TrainState(model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05),
                       scaler=runtime.grad_scaler())
    batch = synthetic_batch(args.batch, args.height, args.width, args.objects, device)

    def step(m, b) -> StepOutput:
        losses = m(*b)
        return StepOutput(dict(losses, loss=sum(losses.values())), len(b[0]))

    timer = _StepTimes(args.warmup, device)
    total = args.warmup + args.iters
    rss0 = _rss_mib()
    try:
        trainer = Trainer(runtime, state, model, [batch] * total, step, max_iters=total, hooks=[timer]).fit()
    except torch.cuda.OutOfMemoryError as e:  # record, don't crash the comparison
        return {"backbone": name, "error": f"out of memory: {e}".splitlines()[0]}
    times, loss = timer.times, trainer.last["loss"]
    ms = statistics.median(times) * 1000
    out = {"backbone": name, "timm_or_elsa_name": BACKBONES[name], "backbone_params_m": round(params / 1e6, 2),
           "step_ms_median": round(ms, 1), "step_ms_all": [round(t * 1000, 1) for t in times],
           "images_per_s": round(args.batch / (ms / 1000), 3), "final_loss": round(loss, 4)}
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["peak_rss_mib"] = round(_rss_mib(), 1)
        out["peak_rss_growth_mib"] = round(_rss_mib() - rss0, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbones", default="elsa_swin_tiny,swin_tiny")
    p.add_argument("--batch", type=int, default=2, help="images per step (official: 2 per GPU)")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import os
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the spawned CPU workers
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    if device.type == "cpu" and args.warmup == 3 and args.iters <= 2:
        args.warmup = 1
    results = []
    for name in args.backbones.split(","):
        if name not in BACKBONES:
            raise SystemExit(f"--backbones: unknown {name!r}; expected some of {sorted(BACKBONES)}")
        if device.type == "cpu":  # a fresh process per backbone, so each peak RSS is its own
            import concurrent.futures
            import multiprocessing

            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                r = ex.submit(bench_one, name, args, device).result()
        else:
            r = bench_one(name, args, device)
        print(json.dumps(r))
        results.append(r)
    import os

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    report = {"benchmark": "det_bench", "detector": "mask_rcnn (official 1x heads)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": dev_name, "torch": torch.__version__, "amp_fp16": device.type == "cuda",
              "args": vars(args), "results": results}
    ok = [r for r in results if "step_ms_median" in r]
    if len(ok) == 2:
        report["elsa_over_swin_time"] = round(ok[0]["step_ms_median"] / ok[1]["step_ms_median"], 3)
        key = "peak_mem_mib" if "peak_mem_mib" in ok[0] else "peak_rss_mib"
        if ok[1].get(key):
            report["elsa_over_swin_memory"] = round(ok[0][key] / ok[1][key], 3)
    path = Path(args.json or Path(__file__).parent / "results" / f"det_bench_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
