"""Model-level speed measurement shared by ``benchmarks/model_bench.py`` and ``elsa benchmark``.

Measures images/s of inference (forward, no grad) and of a training step (forward, cross-entropy, backward,
AdamW step) for timm-registered models, ELSA models next to their baselines, with the settings stated in the
result: device, batch, input size, precision (float32 or bfloat16 autocast), channels_last, torch.compile.
On CUDA every timed region is bracketed by ``torch.cuda.synchronize`` and the peak memory of each measurement is
``torch.cuda.max_memory_allocated`` after a reset. Why one module: the committed JSON results and the CLI must
measure the same thing.
"""
from __future__ import annotations

import datetime
import logging
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .engine.runtime import Runtime, amp_dtype
from .engine.runtime import resolve_device as _resolve_device

_log = logging.getLogger(__name__)

# ELSA model -> the timm model it is compared with (same layout, ELSA blocks swapped in).
PAIRS: Dict[str, str] = {
    "elsa_swin_tiny": "swin_tiny_patch4_window7_224",
    "elsa_swin_small": "swin_small_patch4_window7_224",
    "elsa_swin_base": "swin_base_patch4_window7_224",
    "elsa_volo_d1_224": "volo_d1_224",
}
MODES = ("infer", "train")
PRECISIONS = ("fp32", "bf16")


@dataclass
class BenchSettings:
    """How a model is measured (stored with every result)."""
    device: str = "cpu"
    batch: int = 8
    img_size: Optional[int] = None  # None: the model's default input size
    precision: str = "fp32"  # "fp32", or "bf16" autocast
    channels_last: bool = False
    compile: bool = False
    warmup: int = 1
    iters: int = 3

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={self.iters}, warmup={self.warmup}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class BenchResult:
    """One measurement: a model in one mode under ``settings``."""
    model: str
    mode: str
    settings: dict
    input_size: List[int]
    params_m: float
    images_per_s: float
    ms_per_iter: float
    peak_mem_mb: Optional[float]
    baseline: Optional[str] = None
    extra: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> a CUDA GPU when present, else 'cpu'; other values are checked (elsa.engine.resolve_device)."""
    return str(_resolve_device(device))


def device_name(device: str) -> str:
    """Human name of the device: the GPU's name, or the CPU's with its thread count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """File-name form of the device, e.g. 'cpu' or 'nvidia-h100-80gb-hbm3'."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: str) -> dict:
    """Versions and device, stored beside the figures."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import timm

    return dict(device=device, device_name=device_name(device), torch=torch.__version__, timm=timm.__version__,
                triton=triton_version, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _autocast(settings: BenchSettings):
    """The engine's autocast policy for the measured precision ("bf16": bfloat16 autocast on CPU and CUDA)."""
    device = torch.device(settings.device)
    dtype = amp_dtype(settings.precision == "bf16", device, "bfloat16")
    return Runtime(device=device, amp_dtype=dtype).autocast()


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def create_model(name: str, settings: BenchSettings) -> nn.Module:
    """The timm model ``name`` on the device (ELSA models registered), with the requested size and layout."""
    import timm

    import elsa.models  # noqa: F401  (registers the ELSA models)

    if not timm.is_model(name):
        raise ValueError(f"model {name!r} is not a registered timm/ELSA model (see `elsa models`)")
    kwargs = {} if settings.img_size is None else dict(img_size=settings.img_size)
    model = timm.create_model(name, **kwargs).to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _prepare(name: str, mode: str, settings: BenchSettings, model: nn.Module) -> tuple[Callable[[], None], dict]:
    """One timed step of ``model`` in ``mode`` ('infer': forward without grad; 'train': forward, cross-entropy on
    random labels, backward, AdamW), and what the result records about the input."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = settings.img_size or cfg.get("input_size", (3, 224, 224))[-1]
    in_chans = cfg.get("input_size", (3,))[0]
    num_classes = getattr(model, "num_classes", 1000) or 1000
    x = torch.randn(settings.batch, in_chans, size, size, device=settings.device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (settings.batch,), device=settings.device)
    run_model = torch.compile(model) if settings.compile else model

    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.no_grad(), _autocast(settings):
                run_model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with _autocast(settings):
                loss = nn.functional.cross_entropy(_logits(run_model(x)).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    info = dict(input_size=[in_chans, size, size], params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3))
    return step, info


def measure(name: str, mode: str, settings: BenchSettings, model: Optional[nn.Module] = None) -> BenchResult:
    """Images/s of ``name`` in ``mode`` ('infer' or 'train') under ``settings``.

    'train' is one optimisation step per iteration: forward, cross-entropy on random labels, backward, AdamW.
    Warm-up iterations (compilation, autotuning, allocator) are run first and not timed.
    """
    model = model if model is not None else create_model(name, settings)
    step, info = _prepare(name, mode, settings, model)
    cuda = settings.device.startswith("cuda")
    for _ in range(settings.warmup):
        step()
    _sync(settings.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(settings.device))
    start = time.perf_counter()
    for _ in range(settings.iters):
        step()
    _sync(settings.device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(torch.device(settings.device)) / 2 ** 20 if cuda else None
    return BenchResult(model=name, mode=mode, settings=asdict(settings), images_per_s=settings.batch * settings.iters /
                       elapsed, ms_per_iter=1000 * elapsed / settings.iters, peak_mem_mb=peak,
                       baseline=PAIRS.get(name), **info)


def measure_interleaved(names: Sequence[str], mode: str, settings: BenchSettings,
                        models: Sequence[nn.Module]) -> List[BenchResult]:
    """Images/s of several models measured turn about, one step each per round, from the median step time.

    Why: on a shared CPU the load drifts over a run; models timed one after the other see different machines,
    while alternating steps (and taking medians) puts each ratio on the same machine state.
    """
    steps = [_prepare(n, mode, settings, m) for n, m in zip(names, models)]
    for _ in range(settings.warmup):
        for step, _ in steps:
            step()
    times: List[List[float]] = [[] for _ in steps]
    for _ in range(settings.iters):
        for (step, _), record in zip(steps, times):
            _sync(settings.device)
            start = time.perf_counter()
            step()
            _sync(settings.device)
            record.append(time.perf_counter() - start)
    results = []
    for name, (_, info), record in zip(names, steps, times):
        median = statistics.median(record)
        results.append(BenchResult(model=name, mode=mode, settings=asdict(settings),
                                   images_per_s=settings.batch / median, ms_per_iter=1000 * median, peak_mem_mb=None,
                                   baseline=PAIRS.get(name), extra=dict(step_ms=[round(1000 * t, 1) for t in record]),
                                   **info))
    return results


def expand_models(models: Iterable[str], with_baselines: bool = True) -> List[str]:
    """The models to run, each ELSA model followed by its baseline (when ``with_baselines``), no repeats."""
    out: List[str] = []
    for name in models:
        for n in ([name, PAIRS[name]] if with_baselines and name in PAIRS else [name]):
            if n not in out:
                out.append(n)
    return out


def run(models: Sequence[str], settings_list: Sequence[BenchSettings], modes: Sequence[str] = MODES,
        on_result: Optional[Callable[[BenchResult], None]] = None) -> List[BenchResult]:
    """Measure every model x settings x mode; one model instance per (model, settings), freed afterwards.

    ``on_result`` is called after each measurement (progress bars). A model that fails (e.g. out of memory) is
    logged and recorded with 0 images/s and the error in ``extra``, so one failure does not lose the others.
    """
    results = []
    for settings in settings_list:
        for name in models:
            model = None
            try:
                model = create_model(name, settings)
            except Exception as err:  # a model that cannot even be built: recorded, not fatal
                _log.error("cannot build %s: %s", name, err)
            for mode in modes:
                if model is None:
                    result = BenchResult(name, mode, asdict(settings), [], 0.0, 0.0, 0.0, None, PAIRS.get(name),
                                         extra=dict(error="model could not be built"))
                else:
                    try:
                        result = measure(name, mode, settings, model)
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                        _log.error("%s %s failed: %s", name, mode, err)
                        result = BenchResult(name, mode, asdict(settings), [], 0.0, 0.0, 0.0, None, PAIRS.get(name),
                                             extra=dict(error=str(err).splitlines()[0][:300]))
                        if settings.device.startswith("cuda"):
                            torch.cuda.empty_cache()
                results.append(result)
                if on_result is not None:
                    on_result(result)
            del model
            if settings.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results


def run_interleaved(models: Sequence[str], settings_list: Sequence[BenchSettings], modes: Sequence[str] = MODES,
                    on_result: Optional[Callable[[BenchResult], None]] = None) -> List[BenchResult]:
    """As ``run``, but each ELSA model and its baseline (``PAIRS``) are built together and measured turn about
    (``measure_interleaved``); models without a pair are measured alone."""
    groups: List[List[str]] = []
    for name in models:
        if any(name in g for g in groups):
            continue
        partner = PAIRS.get(name) or next((e for e, b in PAIRS.items() if b == name and e in models), None)
        groups.append([name, partner] if partner in models else [name])
    results = []
    for settings in settings_list:
        for group in groups:
            built = [create_model(n, settings) for n in group]
            for mode in modes:
                for result in measure_interleaved(group, mode, settings, built):
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
            del built
    return results


def format_table(results: Sequence[BenchResult]) -> str:
    """Markdown table; 'vs baseline' is images/s relative to the paired timm model under the same settings."""
    by_key = {(r.model, r.mode, r.settings["precision"], r.settings["batch"]): r for r in results}
    lines = ["| model | mode | precision | batch | input | params (M) | images/s | ms/iter | peak MB | vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.settings
        base = by_key.get((r.baseline, r.mode, s["precision"], s["batch"])) if r.baseline else None
        ratio = f"{r.images_per_s / base.images_per_s:.2f}x {r.baseline}" if base and base.images_per_s else ""
        peak = f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "-"
        size = "x".join(str(v) for v in r.input_size[1:]) or "-"
        err = f" ({r.extra['error']})" if r.extra.get("error") else ""
        lines.append(f"| {r.model} | {r.mode} | {s['precision']} | {s['batch']} | {size} | {r.params_m:.1f} | "
                     f"{r.images_per_s:.3g}{err} | {r.ms_per_iter:.1f} | {peak} | {ratio} |")
    return "\n".join(lines)


def to_json(results: Sequence[BenchResult], device: str, extra_settings: Optional[dict] = None) -> dict:
    """The JSON document written next to the table: environment, settings, every figure."""
    return dict(environment=environment(device), settings=extra_settings or {},
                results=[asdict(r) for r in results])
