"""The Triton backend's head-aware entry (``num_heads``): v and the logits read through the strides a channels-last
projection writes, one ghost per head for the whole batch (its gradient reduced inside the op), channels-last
outputs; against the ``reference`` backend, forward and every gradient, on the CUDA-core kernels (float32) and
the tensor-core kernels (float16/bfloat16). Without CUDA the kernels run in Triton's interpreter (slow): the
shapes are small, except one case at the tiles a GPU uses.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from elsa.ops import elsa_aggregate, elsa_softmax_aggregate  # noqa: E402
from elsa.ops.triton import why_not  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if why_not(torch.empty(0, device=DEVICE)) is not None:
    pytest.skip(f"triton backend cannot run here: {why_not(torch.empty(0, device=DEVICE))}", allow_module_level=True)

from elsa.ops.triton import band, op  # noqa: E402
from tests.dispatch_count import CountOps  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}
NAMES = ("v", "logits", "ghost_mul", "ghost_add")


def projection_output(b, heads, c, h, w, k, stride, mul, add, dtype=torch.float32, seed=0, per_sample=False):
    """v and logits as the layer's channels-last projections write them: slices of (B, H, W, X) buffers viewed
    as (B, X, H, W). Ghosts (G, C, K, K), or (B, G, C, K, K) with ``per_sample``."""
    gen = torch.Generator().manual_seed(seed)
    ho, wo = h // stride, w // stride
    qkv = torch.randn(b, h, w, 3 + heads * c, generator=gen)  # v is the last G*C channels of a wider buffer
    v = qkv[..., 3:].to(DEVICE, dtype).permute(0, 3, 1, 2)
    logits = (torch.randn(b, ho, wo, heads * k * k, generator=gen) * 3).to(DEVICE, dtype).permute(0, 3, 1, 2)
    ghost_shape = (b, heads, c, k, k) if per_sample else (heads, c, k, k)
    m = torch.randn(ghost_shape, generator=gen).to(DEVICE, dtype) if mul else None
    d = torch.randn(ghost_shape, generator=gen).to(DEVICE, dtype) if add else None
    return v, logits, m, d


def _flat_reference(v, logits, m, d, heads, k, dilation, stride, softmax):
    """The same operator as the reference backend's flat form: heads split into the batch, one ghost per sample
    (re-derived here for the per-sample ghosts, which the public head-aware entry does not take)."""
    b, gc, h, w = v.shape
    ho, wo = logits.shape[-2:]
    vf = v.reshape(b * heads, gc // heads, h, w)
    lf = logits.reshape(b * heads, k * k, ho, wo)
    mf, df = (None if t is None else t.expand(b, *t.shape[-4:]).reshape(b * heads, -1, k, k) for t in (m, d))
    entry = elsa_softmax_aggregate if softmax else elsa_aggregate
    out = entry(vf, lf, mf, df, kernel_size=k, dilation=dilation, stride=stride, backend="reference")
    return out.reshape(b, gc, ho, wo)


def _compare(inputs, heads, k, dilation, stride, softmax, direct=False, seed=1):
    """Triton's head-aware call vs the float32 reference, forward and the gradient of every input."""
    dtype = inputs[0].dtype
    atol, rtol = TOL[dtype]

    def run(tensors, backend):
        leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
        if backend == "reference":
            if direct:
                return _flat_reference(*leaves, heads, k, dilation, stride, softmax), leaves
            entry = elsa_softmax_aggregate if softmax else elsa_aggregate
            return entry(*leaves, kernel_size=k, dilation=dilation, stride=stride, num_heads=heads,
                         backend="reference"), leaves
        if direct:  # the op itself, e.g. with per-sample ghosts
            fn = op.triton_softmax_aggregate if softmax else op.triton_aggregate
            return fn(*leaves, k, dilation, stride, heads), leaves
        entry = elsa_softmax_aggregate if softmax else elsa_aggregate
        return entry(*leaves, kernel_size=k, dilation=dilation, stride=stride, num_heads=heads,
                     backend="triton"), leaves

    out, leaves = run(inputs, "triton")
    ref, ref_leaves = run([None if t is None else t.float() for t in inputs], "reference")
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.permute(0, 2, 3, 1).is_contiguous()  # channels-last, as the next projection reads it
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol, msg=lambda m: f"forward: {m}")

    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    wanted = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in wanted], grad_out.float())
    for i, g, rg in zip(wanted, grads, ref_grads):
        assert g.dtype == dtype and g.shape == inputs[i].shape
        assert rg.abs().max() > 0
        # a ghost's gradient sums over pixels and the batch: its error scales with the sums, not with each term
        scale = rg.abs().max().item() if i >= 2 and dtype != torch.float32 else 1.0
        torch.testing.assert_close(g.float(), rg, atol=atol * scale, rtol=rtol,
                                   msg=lambda m: f"grad {NAMES[i]}: {m}")


# (B, G, C, H, W, K, dilation, stride, ghost_mul, ghost_add): CUDA-core kernels (float32). Odd sizes, K close to the
# map, stride 2, dilation 2, several pixel tiles (11 x 11 > 64 pixels, the interpreter's tile) and partial channel
# blocks (the interpreter's tile holds 4 channels), every ghost combination.
CASES = [
    pytest.param(2, 2, 3, 7, 9, 3, 1, 1, True, True, id="b2-g2-k3-both"),
    pytest.param(1, 3, 4, 9, 7, 5, 2, 2, True, False, id="b1-g3-k5-r2-s2-mul"),
    pytest.param(2, 2, 2, 8, 7, 7, 1, 2, False, True, id="b2-g2-k7-s2-add"),
    pytest.param(1, 2, 6, 11, 11, 3, 2, 1, False, False, id="b1-g2-c6-k3-r2-none-11x11"),
]


@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
@pytest.mark.parametrize("b,g,c,h,w,k,dilation,stride,mul,add", CASES)
def test_heads_match_reference(b, g, c, h, w, k, dilation, stride, mul, add, softmax):
    inputs = projection_output(b, g, c, h, w, k, stride, mul, add, seed=b + g + c + k)
    assert inputs[0].stride(1) == 1 and inputs[1].stride(1) == 1  # channels-last, as the projections write
    _compare(inputs, g, k, dilation, stride, softmax)


@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
def test_heads_per_sample_ghosts(softmax):
    """Ghosts (B, G, C, K, K), one per sample and head (what the dispatcher makes of the flat form), through the op."""
    inputs = projection_output(2, 2, 3, 7, 8, 3, 1, True, True, seed=7, per_sample=True)
    _compare(inputs, 2, 3, 1, 1, softmax, direct=True)


def test_heads_bad_ghost_shape_is_refused():
    v, logits, m, _ = projection_output(2, 2, 3, 5, 5, 3, 1, True, False)
    with pytest.raises(ValueError, match="ghost"):
        op.triton_aggregate(v, logits, m[:1], None, 3, 1, 1, 2)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
def test_heads_gradcheck_cuda_core(softmax):
    """Finite differences of the forward against the backward, on the CUDA-core kernels. They compute in float32
    (float64 is refused by the backend), so this is a float32 gradcheck with float32 tolerances; the float64
    check of the formula itself is the reference backend's. Fast mode (random directions): the interpreter
    would take minutes for one forward per input element."""
    v, logits, m, d = projection_output(1, 2, 2, 4, 5, 3, 1, True, True, seed=11)
    logits = logits / 3  # keep the softmax smooth at the finite-difference step
    fn = op.triton_softmax_aggregate if softmax else op.triton_aggregate

    def f(*ts):
        return fn(*ts, 3, 1, 1, 2)

    inputs = [t.detach().requires_grad_() for t in (v, logits, m, d)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-2, atol=2e-3, rtol=2e-3, nondet_tol=1e-5, fast_mode=True)


# Tensor-core kernels: float16/bfloat16, stride 1, no multiplicative ghost, >= 16 channels per head.
BAND_CASES = [
    # B, G, C, H, W, K, dilation, ghost_add
    pytest.param(2, 2, 16, 9, 10, 3, 1, True, id="b2-g2-c16-k3-add"),
    pytest.param(1, 3, 16, 7, 11, 5, 2, False, id="b1-g3-c16-k5-r2-none"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
@pytest.mark.parametrize("b,g,c,h,w,k,dilation,add", BAND_CASES)
def test_heads_tensor_cores_match_reference(b, g, c, h, w, k, dilation, add, softmax, dtype, monkeypatch):
    calls = []
    real = band.band_aggregate
    monkeypatch.setattr(band, "band_aggregate", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    inputs = projection_output(b, g, c, h, w, k, 1, False, add, dtype=dtype, seed=c + k)
    assert band.applies(inputs[0], None, 1, g)
    _compare(inputs, g, k, dilation, 1, softmax)
    assert len(calls) == 2  # forward and v gradient on tensor cores


def test_heads_tensor_cores_real_tile():
    """At the tile a GPU uses (band.BAND_TILES[0]: 32 channels, 16 x 16 pixels; the interpreter runs it too):
    three heads of 32 channels, 2 x 2 pixel tiles of a 20 x 18 map, K = 7, bfloat16, fused softmax."""
    assert band.BAND_TILES[0][:3] == (32, 16, 16)
    inputs = projection_output(2, 3, 32, 20, 18, 7, 1, False, True, dtype=torch.bfloat16, seed=5)
    _compare(inputs, 3, 7, 1, 1, True)


@pytest.mark.parametrize("tile", [(32, 32, 8, 8, 1), (32, 32, 8, 8, 2)], ids=["forward-and-grad-v", "logit-grad"])
def test_heads_tensor_cores_stage1_tile(tile, monkeypatch):
    """The tiles benchmarks/kernel_sass.py picks for ELSA-Swin-T's stage 1 (32 x 8 pixels, 32 channels; the first
    is the forward's and the v gradient's, the second the logit gradient's): two heads on a 40 x 18 map, so
    2 x 3 pixel tiles with partial ones at the bottom and right, K = 7, bfloat16, fused softmax."""
    fixed = []  # per launch: whether it ran this tile
    real_launch = band._launch
    monkeypatch.setattr(band, "_launch", lambda kernel, tiles, *args, **kwargs: (
        fixed.append(tile in tiles), real_launch(kernel, tiles, *args, **kwargs)))
    inputs = projection_output(1, 2, 32, 40, 18, 7, 1, False, True, dtype=torch.bfloat16, seed=7)
    with band.fixed_tile(tile):
        _compare(inputs, 2, 7, 1, 1, True)
    assert fixed == ([True, False, True] if tile in band.BAND_TILES else [False, True, False])


def test_heads_opcheck():
    """Schema, fake (meta) implementations with channels-last strides, autograd registration, AOT dispatch."""
    v, logits, m, d = projection_output(2, 2, 2, 5, 6, 3, 1, True, True, seed=2)
    args = (v.requires_grad_(), logits.requires_grad_(), m.requires_grad_(), d.requires_grad_(), 3, 1, 1, 2)
    torch.library.opcheck(op.triton_softmax_aggregate, args)
    torch.library.opcheck(op.triton_aggregate, args)
    g = torch.randn(2, 5, 6, 4, device=DEVICE).permute(0, 3, 1, 2)
    torch.library.opcheck(op.triton_aggregate_backward,
                          (g, v.detach(), logits.detach(), m.detach(), d.detach(), 3, 1, 1, 2, True,
                           True, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_layer_forward_makes_no_copies_on_triton():
    """The ELSA layer's forward on the triton backend: the projections' outputs go into the op and its output to
    the next projection as they are (the flattening it replaced copied v, the logits, the ghosts and the output)."""
    from elsa import ELSA

    for lam in (0, 1):  # additive ghost only (ELSA-Swin), both ghosts
        layer = ELSA(24, num_heads=3, kernel_size=5, lam=lam, qkv_bias=True, qk_scale=1.0, backend="triton").eval()
        x = torch.randn(2, 7, 6, 24)
        with torch.no_grad(), CountOps() as mode:
            out = layer(x)
        assert "elsa.triton_softmax_aggregate" in mode.ops
        copies = [o for o in mode.ops if o.split(".")[-1] in ("clone", "copy_", "contiguous", "_to_copy", "expand")]
        assert copies == [], copies
        layer.backend = "reference"
        torch.testing.assert_close(out, layer(x), atol=1e-4, rtol=1e-4)
