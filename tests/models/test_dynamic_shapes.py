"""ELSA-Swin at changing input sizes under torch.compile, torch.export and torch.jit.trace.

The window stage's padding, cyclic shift and shift mask are checked against timm's own Swin helpers (an independent
implementation of the same rules); the compiled, exported and traced models against eager at sizes other than the
one they were built at."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

import elsa  # noqa: F401  (registers the models)
from elsa.dense.backbone import ELSASwinBackbone
from elsa.models.elsa_swin import SwinBlock, _shift_mask


def timm_shift_mask(hp, wp, window, shift):
    """timm's Swin mask rule for a padded (hp, wp) map (its block computes it from the map it is given)."""
    block = SwinTransformerBlock(dim=8, input_resolution=(hp, wp), num_heads=1, window_size=window,
                                 shift_size=shift, always_partition=True, dynamic_mask=True)
    return block.get_attn_mask(torch.zeros(1, hp, wp, 1))


@pytest.mark.parametrize("nh,nw,window,shift", [(1, 1, 4, 2), (2, 3, 4, 2), (3, 2, 7, 3), (2, 2, 5, 1)])
def test_shift_mask_is_swins_rule(nh, nw, window, shift):
    torch.testing.assert_close(_shift_mask(nh, nw, window, shift, torch.device("cpu")),
                               timm_shift_mask(nh * window, nw * window, window, shift))


def six_step_attend(block, x):
    """The window stage spelled out as the official detection backbone does: pad to whole windows, roll, partition
    (timm's helpers), attend with Swin's mask, reverse, roll back, crop."""
    b, h, w, c = x.shape
    ws, shift = block.window_size, block.shift_size
    if not block.always_shift and min(h, w) <= ws:
        shift = 0
    x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
    hp, wp = x.shape[1:3]
    mask = None
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
        mask = timm_shift_mask(hp, wp, ws, shift)
    out = block.attn(window_partition(x, (ws, ws)).view(-1, ws * ws, c), mask)
    out = window_reverse(out.view(-1, ws, ws, c), (ws, ws), hp, wp)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :h, :w]


@pytest.mark.parametrize("shift,always_shift", [(False, False), (True, False), (True, True)])
def test_window_stage_is_pad_roll_partition(shift, always_shift):
    torch.manual_seed(0)
    block = SwinBlock(16, 2, window_size=4, shift=shift, always_shift=always_shift).eval()
    for size in [(4, 4), (8, 8), (9, 13), (3, 17)]:
        x = torch.randn(2, *size, 16)
        with torch.no_grad():
            torch.testing.assert_close(block._attend(x), six_step_attend(block, x), atol=1e-6, rtol=1e-5)


def test_compile_follows_the_input_size_without_recompiling(one_thread):
    """fullgraph, dynamic sizes: one graph for every map larger than one window (the dynamo tracing that used to
    stall in sympy at the second size; the inductor timings are in benchmarks/export_bench.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico").eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for size in [(40, 48), (48, 72), (64, 56)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
            if size == (40, 48):
                graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # the later sizes reused the first graph


def test_export_with_dynamic_height_and_width(one_thread):
    """The dense backbone (what detection and segmentation run at many sizes), exported once with symbolic batch,
    height and width, runs at other sizes like eager (odd sizes too: padding to whole windows and patches).
    Dim.DYNAMIC: torch.export cannot prove some always-true stride guards of the ELSA layer over an explicit range."""
    torch.manual_seed(0)
    backbone = ELSASwinBackbone.from_name("elsa_swin_pico", out_indices=(1, 2), drop_path_rate=0.0).eval()
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.export.export(backbone, (torch.randn(2, 3, 40, 48),),
                                  dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}})
    with torch.no_grad():
        for size in [(64, 40), (37, 83)]:
            x = torch.randn(3, 3, *size)
            for got, expected in zip(program.module()(x), backbone(x)):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_trace_at_one_size_is_right_at_another():
    """torch.jit.trace (and the TorchScript-based ONNX exporter) freeze Python branches: traced where the last map is
    one window (no shift), the window stage must still shift where it is larger, and its shape logic must not need a
    TracerWarning (the operator's argument checks, on static channel counts, may still warn)."""
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, torch.randn(1, 3, 32, 32))
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
                and w.filename.endswith("elsa_swin.py")]
    with torch.no_grad():
        for size in [(64, 80), (48, 33)]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True])
def test_backbone_onnx_with_dynamic_height_and_width(tmp_path, dynamo, one_thread):
    """Both ONNX exporters, batch, height and width dynamic, run in onnxruntime at other sizes (the smallest backbone
    with a shifting window stage: one ELSA block per stage)."""
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    torch.manual_seed(0)
    backbone = ELSASwinBackbone.from_name("elsa_swin_pico", depths=(1, 1, 2), out_indices=(2,),
                                          drop_path_rate=0.0).eval()
    path, x = str(tmp_path / "backbone.onnx"), torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        if dynamo:
            dynamic = torch.export.Dim.DYNAMIC
            torch.onnx.export(backbone, (x,), path, dynamo=True, input_names=["x"], external_data=False,
                              dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}})
        else:
            torch.onnx.export(backbone, (x,), path, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for size in [(64, 40), (37, 83)]:
            x = torch.randn(3, 3, *size)
            got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
            torch.testing.assert_close(got, backbone(x)[0], atol=1e-4, rtol=1e-4)
