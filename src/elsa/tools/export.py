"""Export a model for deployment: ONNX (either exporter) or a torch.export program (.pt2), checked after writing.

ONNX has no ELSA custom op: while an ONNX exporter traces, ``elsa.ops`` writes the operator in standard ops
(``elsa.ops.decomposed``), so the file runs in any ONNX runtime. A .pt2 program keeps the ``elsa::*`` custom ops
(the fast kernels); loading it needs ``import elsa`` first. The batch axis is dynamic in both; with
``dynamic_size`` height and width too. Every export is checked: the written file is loaded and run at another batch
size than the traced one (and, with ``dynamic_size``, at ``check_size``), against eager PyTorch.

With ``dynamic_size``, the torch.export-based paths (dynamo ONNX, pt2) keep the ranges torch.export proves: the
classifier's window stage shifts only where its last map is larger than one window, and torch.export keeps the
side of that rule it traced (a guard rejects inputs on the other side): trace at a size like those you will run.
The TorchScript-based exporter records that decision as a tensor and serves both sides.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

FORMATS = ("onnx", "pt2")
EXPORTERS = ("dynamo", "torchscript")


@dataclass
class ExportReport:
    path: str
    format: str
    exporter: str
    seconds: float
    max_abs_diff: float  # written file vs eager, at a batch size other than the traced one


def export_model(model: nn.Module, path: Union[str, os.PathLike], fmt: str = "onnx", img_size: int = 224,
                 in_chans: int = 3, batch: int = 2, exporter: str = "dynamo", dynamic_size: bool = False,
                 check_size: Optional[int] = None) -> ExportReport:
    """Write ``model`` (eval mode, CPU) to ``path`` as ``fmt`` with a dynamic batch axis (and height and width with
    ``dynamic_size``), then check the file at batch + 1 and ``check_size`` (default: ``img_size``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    check_size = img_size if check_size is None else check_size
    if check_size != img_size and not dynamic_size:
        raise ValueError(f"check_size must equal img_size ({img_size}) without dynamic_size, got {check_size}")
    if check_size < 1:
        raise ValueError(f"check_size must be >= 1, got {check_size}")
    model = model.eval().cpu()
    x = torch.randn(batch, in_chans, img_size, img_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix or f".{fmt}", dir=path.parent)  # written whole, then renamed
    os.close(fd)
    try:
        # Dim.DYNAMIC for the sizes: torch.export cannot prove some always-true stride guards over a named range
        dims = (dict.fromkeys((0, 2, 3), torch.export.Dim.DYNAMIC) if dynamic_size
                else {0: torch.export.Dim("batch")})
        axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
        start = time.perf_counter()
        with torch.no_grad():
            if fmt == "pt2":
                program = torch.export.export(model, (x,), dynamic_shapes={"x": dims})
                torch.export.save(program, tmp)
            elif exporter == "dynamo":
                torch.onnx.export(model, (x,), tmp, dynamo=True, input_names=["x"], output_names=["y"],
                                  dynamic_shapes={"x": dims}, external_data=False)
            else:
                torch.onnx.export(model, (x,), tmp, dynamo=False, input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": axes, "y": {0: "batch"}})
        seconds = time.perf_counter() - start
        diff = _check(tmp, fmt, model, torch.randn(batch + 1, in_chans, check_size, check_size))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportReport(str(path), fmt, "torch.export" if fmt == "pt2" else exporter, round(seconds, 1), diff)


def _check(file: str, fmt: str, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x)
        if fmt == "pt2":
            got = torch.export.load(file).module()(x)
        else:
            try:
                import onnxruntime
            except ImportError as err:
                raise ImportError("checking an ONNX export needs onnxruntime: pip install 'elsa[export]'") from err
            session = onnxruntime.InferenceSession(file, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    return float((got - expected).abs().max())
