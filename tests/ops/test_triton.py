"""The Triton backend against the unfold reference: forward and every gradient separately.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before
anything imports triton), which costs roughly a millisecond per tensor op per program and per neighbour;
hence the small shapes (N <= 2, C <= 4, H, W <= 11). On a CUDA machine the same tests run on the GPU.
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
if why_not(torch.empty(0, device=DEVICE)) is not None:  # e.g. TRITON_INTERPRET=0 forced on a CPU machine
    pytest.skip(f"triton backend cannot run here: {why_not(torch.empty(0, device=DEVICE))}",
                allow_module_level=True)

from elsa.ops.triton import op  # noqa: E402

# (atol, rtol) per dtype. Low-precision results are compared with the float32 reference on the same
# (rounded) inputs: the kernels accumulate in float32, so the error is the final rounding plus, for the
# fused-softmax logits gradient, the rounding of the intermediate dp to the storage dtype.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
NAMES = ("v", "attn", "ghost_mul", "ghost_add")


def _inputs(n, c, h, w, k, stride, mul, add, dtype=torch.float32, seed=0, logit_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = h // stride, w // stride

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)

    return [
        rnd(n, c, h, w),
        rnd(n, k * k, ho, wo, scale=logit_scale),
        rnd(n, c, k, k) if mul else None,
        rnd(n, c, k, k) if add else None,
    ]


def _compare(inputs, kernel_size, dilation, stride, softmax=False, requires=None, seed=1):
    """Triton output and each requested gradient vs the float32 reference on the same inputs."""
    dtype = inputs[0].dtype
    atol, rtol = TOL[dtype]
    requires = [t is not None for t in inputs] if requires is None else requires
    entry = elsa_softmax_aggregate if softmax else elsa_aggregate

    def run(tensors, backend):
        leaves = [t.detach().clone().requires_grad_(r) if t is not None else None
                  for t, r in zip(tensors, requires)]
        out = entry(*leaves, kernel_size=kernel_size, dilation=dilation, stride=stride, backend=backend)
        return out, leaves

    out, leaves = run(inputs, "triton")
    ref, ref_leaves = run([t.float() if t is not None else None for t in inputs], "reference")
    assert out.dtype == dtype and out.shape == ref.shape
    assert ref.abs().max() > 0.1  # the inputs exercise something
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol, msg=lambda m: f"forward: {m}")

    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    wanted = [i for i, t in enumerate(leaves) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in wanted], grad_out.float())
    for i, g, rg in zip(wanted, grads, ref_grads):
        assert g.dtype == dtype and g.shape == inputs[i].shape
        assert rg.abs().max() > 0
        torch.testing.assert_close(g.float(), rg, atol=atol, rtol=rtol, msg=lambda m: f"grad {NAMES[i]}: {m}")


# (N, C, H, W, K, dilation, stride, ghost_mul, ghost_add): odd sizes, every ghost combination, stride 2,
# dilation 2, kernel as large as (and larger than) the map, more than one pixel tile (11x11: the interpreter
# runs 64-pixel tiles, so ghost gradients are summed atomically over tiles).
CASES = [
    pytest.param(2, 3, 7, 9, 3, 1, 1, True, True, id="k3-both"),
    pytest.param(2, 4, 9, 7, 5, 1, 2, True, False, id="k5-s2-mul"),
    pytest.param(1, 3, 11, 11, 3, 2, 1, False, True, id="k3-r2-add-11x11"),
    pytest.param(1, 2, 7, 9, 7, 1, 1, False, False, id="k7-none"),
    pytest.param(1, 3, 11, 11, 5, 2, 2, True, True, id="k5-r2-s2-both-11x11"),
    pytest.param(1, 2, 7, 9, 13, 1, 1, True, True, id="k13-both"),
]


@pytest.mark.parametrize("n,c,h,w,k,dilation,stride,mul,add", CASES)
def test_matches_reference(n, c, h, w, k, dilation, stride, mul, add):
    _compare(_inputs(n, c, h, w, k, stride, mul, add), k, dilation, stride)


@pytest.mark.parametrize("n,c,h,w,k,dilation,stride,mul,add", [
    pytest.param(2, 3, 7, 9, 3, 1, 1, True, True, id="k3-both"),
    pytest.param(1, 4, 9, 7, 5, 2, 2, False, True, id="k5-r2-s2-add"),
    pytest.param(1, 2, 7, 9, 7, 1, 1, True, False, id="k7-mul"),
    pytest.param(1, 2, 11, 11, 3, 1, 1, False, True, id="k3-add-11x11"),
])
def test_softmax_matches_reference(n, c, h, w, k, dilation, stride, mul, add):
    # Logits with a spread of several units, so the softmax is far from uniform.
    _compare(_inputs(n, c, h, w, k, stride, mul, add, logit_scale=3.0), k, dilation, stride, softmax=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
def test_low_precision(dtype, softmax):
    _compare(_inputs(2, 3, 7, 9, 3, 1, True, True, dtype=dtype, logit_scale=2.0), 3, 1, 1, softmax=softmax)


@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
@pytest.mark.parametrize("requires", [(True, False, False, False), (False, True, True, False),
                                      (False, False, False, True)], ids=["v", "attn+mul", "add"])
def test_partial_gradients(softmax, requires):
    # Each subset of gradients takes its own path (with the softmax, v alone still needs the lse pass).
    _compare(_inputs(1, 3, 7, 9, 3, 2, True, True), 3, 1, 2, softmax=softmax, requires=requires)


@pytest.mark.parametrize("c", [4, 6, 8], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
def test_channel_blocks(c, softmax):
    # The interpreter's tile holds 4 channels: one full block (no channel masks), a full and a partial block,
    # two full blocks. The forward and grad_v split channels over programs, grad_attn loops over them.
    assert op.INTERPRET_TILE[0] == 4 or not op.INTERPRET
    _compare(_inputs(1, c, 7, 9, 3, 1, True, True), 3, 1, 1, softmax=softmax)


def test_tile_pruning():
    """Channel blocks wider than the channels are dropped, but the narrowest tiles always stay."""
    configs = op.tile_configs(op.GATHER_TILES)
    widths = lambda c: sorted({cfg.kwargs["BLOCK_C"] for cfg in op._prune_channel_blocks(configs, {"C": c})})  # noqa: E731
    assert widths(1) == widths(3) == widths(8) == [8]
    assert widths(20) == widths(32) == [8, 32]
    assert widths(64) == widths(1000) == [8, 32, 64]


@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
def test_non_contiguous(softmax):
    """Inputs as the ELSA layer produces them: head splits of bigger tensors, expanded ghosts."""
    n, c, h, w, k = 2, 3, 7, 9, 3
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, h, w, 4 * c, generator=gen).to(DEVICE).requires_grad_()
    v = qkv.permute(0, 3, 1, 2)[:, 2 * c:3 * c]  # channels-last view, channel slice
    logits = torch.randn(n, w, h, k * k + 2, generator=gen).to(DEVICE).requires_grad_()
    attn = logits[..., 1:k * k + 1].permute(0, 3, 2, 1)  # (N, K*K, H, W) with odd strides
    p_mul = torch.randn(1, c, k, k, generator=gen).to(DEVICE).requires_grad_()
    p_add = torch.randn(1, c, k, k, generator=gen).to(DEVICE).requires_grad_()
    assert not v.is_contiguous() and not attn.is_contiguous()
    entry = elsa_softmax_aggregate if softmax else elsa_aggregate

    results = []
    for backend in ("triton", "reference"):
        out = entry(v, attn, p_mul.expand(n, -1, -1, -1), p_add.expand(n, -1, -1, -1),
                    kernel_size=k, backend=backend)
        # The gradient of a sum is an expanded (stride 0) tensor: the backward must read it by strides.
        grads = torch.autograd.grad((out * 0.5).sum() + out[:, :, 1:, :3].sum(), [qkv, logits, p_mul, p_add])
        results.append((out, *grads))
    for name, a, b in zip(("out", "qkv", "logits", "ghost_mul", "ghost_add"), *results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_float64_is_refused():
    # The kernels compute in float32; float64 goes to another backend rather than losing precision silently.
    v, attn, _, _ = _inputs(1, 2, 5, 5, 3, 1, False, False, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        elsa_aggregate(v, attn, backend="triton")


def test_extreme_logits():
    # -inf logits (masked neighbours) and large ones: the online softmax must stay finite.
    v, logits, m, d = _inputs(1, 2, 7, 9, 3, 1, True, True, logit_scale=30.0)
    logits[:, :4] = float("-inf")
    out = elsa_softmax_aggregate(v, logits, m, d, backend="triton")
    ref = elsa_softmax_aggregate(v, logits, m, d, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
def test_opcheck(softmax):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom ops, called as
    the flat form with one head (num_heads left at its default; N = 1 makes the (N, C, K, K) ghosts (G, C, K, K))."""
    v, attn, m, d = _inputs(1, 2, 5, 7, 3, 1, True, True)
    fwd = op.triton_softmax_aggregate if softmax else op.triton_aggregate
    args = (v.requires_grad_(), attn.requires_grad_(), m.requires_grad_(), d.requires_grad_(), 3, 1, 1)
    torch.library.opcheck(fwd, args)
    g = torch.randn(1, 2, 5, 7, device=DEVICE)
    # The backward op has no autograd of its own (no double backward): schema and fake implementation.
    torch.library.opcheck(op.triton_aggregate_backward,
                          (g, v.detach(), attn.detach(), m.detach(), None, 3, 1, 1, 1, softmax, True, True, True,
                           False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """The ops trace as opaque calls under torch.compile(fullgraph=True), forward and backward."""
    v, attn, m, d = _inputs(1, 2, 7, 9, 3, 2, False, True)

    def fn(v, logits, d):
        return elsa_softmax_aggregate(v, logits, None, d, stride=2, backend="triton").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (v, attn, d)]
    eager_out = fn(*leaves)
    eager_grads = torch.autograd.grad(eager_out, leaves)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    torch.testing.assert_close(out, eager_out)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)


_COMPILE_SCRIPT = r"""
from elsa.ops.triton import kernels
from elsa.ops.triton.aot import compile_for  # bfloat16 pointers, 4 warps, sm_90 by default

geom = dict(K=5, DIL=2, STRIDE=2, BLOCK_C=32, BLOCK_P=64)
for even_c, all_c in ((False, False), (True, True)):
    compile_for(kernels.elsa_fwd_kernel, dict(geom, HAS_MUL=True, HAS_ADD=True, SOFTMAX=True, EVEN_C=even_c))
    compile_for(kernels.elsa_bwd_attn_kernel,
                dict(geom, HAS_MUL=True, SOFTMAX=True, WRITE_LSE=True, NEED_ATTN=True, NEED_MUL=True,
                     NEED_ADD=True, ALL_C=all_c, EVEN_C=even_c))
    compile_for(kernels.elsa_bwd_v_kernel, dict(geom, HAS_MUL=True, HAS_ADD=True, SOFTMAX=True, EVEN_C=even_c))

from elsa.ops.triton import band, kernels_tc

def tile(c, th, tw, vec):
    return dict(K=5, DIL=2, BLOCK_C=c, TILE_H=th, TILE_W=tw, SPAN=band.span(tw, 5, 2, vec), KP=8, UPCAST_DOT=False)

for c, th, tw, warps, _ in band.BAND_TILES:
    for vec, transposed in ((8, False), (4, True), (1, False)):
        compile_for(kernels_tc.elsa_band_kernel, dict(tile(c, th, tw, vec), HAS_ADD=True, SOFTMAX=True,
                    TRANSPOSED=transposed, EVEN_C=vec == 8, VEC=vec), dtype="fp16", num_warps=warps)
for c, th, tw, warps, _ in band.BAND_BWD_TILES:
    for vec in (8, 4, 1):
        compile_for(kernels_tc.elsa_band_bwd_attn_kernel, dict(tile(c, th, tw, vec), SOFTMAX=True, WRITE_LSE=True,
                    NEED_ATTN=True, NEED_ADD=True, ALL_C=False, VEC=vec, G_VEC=8 // vec), num_warps=warps)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the other tests run the compiled kernels on this GPU")
def test_kernels_compile_for_h100():
    """The interpreter accepts code the GPU compiler rejects: compile every kernel for sm_90 (no GPU needed,
    Triton ships ptxas), with every constexpr branch switched on."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas for the CUDA backend")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Tensor-core (row-band) kernels, kernels_tc.py: stride 1, no multiplicative ghost, float16/bfloat16, C >= 16.
# The interpreter runs them at the tile a GPU uses (band.BAND_TILES[0]: 32 channels, 16 x 16 pixels), so these
# cases have realistic channel counts and several pixel tiles. Under the interpreter the kernels upcast their
# (already rounded) tl.dot operands to float32 (``UPCAST_DOT``): its bfloat16 tl.dot multiplies raw bits.

from elsa.ops.triton import band  # noqa: E402

BAND_CASES = [
    # N, C, H, W, K, dilation, ghost_add
    pytest.param(1, 32, 20, 19, 7, 1, True, id="c32-k7-2x2tiles-add"),
    pytest.param(2, 16, 9, 18, 3, 2, False, id="c16-k3-r2-none"),
    pytest.param(1, 48, 17, 12, 5, 1, True, id="c48-k5-partial-channel-block-add"),
    pytest.param(1, 64, 16, 33, 7, 1, True, id="c64-k7-3tiles-add"),
    pytest.param(1, 16, 10, 12, 13, 1, True, id="c16-k13-add"),
    # W % 8 == 0 and 16-byte strides: vectors of 8 columns (window masks per 8-column chunk, 16-byte loads),
    # then of 4
    pytest.param(2, 32, 13, 40, 7, 1, True, id="c32-k7-vec8-3tiles-add"),
    pytest.param(1, 16, 9, 28, 5, 2, True, id="c16-k5-r2-vec4-add"),
]


@pytest.fixture
def band_calls(monkeypatch):
    """Counts the launches of the tensor-core kernels: the tests below must run them, not the fallback."""
    calls = []
    real_agg, real_bwd = band.band_aggregate, band.backward

    def agg(*args, **kwargs):
        calls.append("aggregate")
        return real_agg(*args, **kwargs)

    def bwd(*args, **kwargs):
        calls.append("backward")
        return real_bwd(*args, **kwargs)

    monkeypatch.setattr(band, "band_aggregate", agg)
    monkeypatch.setattr(band, "backward", bwd)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softmax", [False, True], ids=["plain", "softmax"])
@pytest.mark.parametrize("n,c,h,w,k,dilation,add", BAND_CASES)
def test_band_matches_reference(n, c, h, w, k, dilation, add, softmax, dtype, band_calls):
    inputs = _inputs(n, c, h, w, k, 1, False, add, dtype=dtype, logit_scale=3.0 if softmax else 0.5)
    assert band.applies(inputs[0], None, 1)
    strides = {f"ss_{d}": st for d, st in zip("bchw", inputs[0].stride())}
    vec = band.vector_width(dict(W=w, src_ptr=inputs[0], **strides))
    assert vec == (8 if w % 8 == 0 else 4 if w % 4 == 0 else 2 if w % 2 == 0 else 1)
    _compare(inputs, k, dilation, 1, softmax=softmax)
    assert band_calls[:2] == ["aggregate", "backward"]


@pytest.mark.parametrize("tile", sorted(set(band.BAND_TILES) | set(band.BAND_BWD_TILES)),
                         ids=lambda t: "c{}-{}x{}-w{}-s{}".format(*t))
def test_band_every_tile(tile, band_calls, monkeypatch):
    """Each tile the autotuner may choose on a GPU (the interpreter otherwise runs only the first), with two
    channel blocks where the tile's block is 32 wide and a partial one where it is 64."""
    fixed = []  # per launch: whether it ran the fixed tile (it does for the kernels that list it)
    real_launch = band._launch
    monkeypatch.setattr(band, "_launch", lambda kernel, tiles, *args, **kwargs: (
        fixed.append(tile in tiles), real_launch(kernel, tiles, *args, **kwargs)))
    inputs = _inputs(1, 48, 17, 20, 7, 1, False, True, dtype=torch.bfloat16, logit_scale=3.0)
    with band.fixed_tile(tile):
        _compare(inputs, 7, 1, 1, softmax=True)
    assert band_calls[:2] == ["aggregate", "backward"]
    assert len(fixed) == 3 and any(fixed)  # forward, logit gradient, v gradient


@pytest.mark.parametrize("requires", [(True, False, False, False), (False, True, False, False),
                                      (False, False, False, True)], ids=["v", "attn", "add"])
def test_band_partial_gradients(requires, band_calls):
    # Each subset takes its own path; with the softmax, v alone still needs the log-sum-exp pass.
    inputs = _inputs(1, 32, 18, 17, 5, 1, False, True, dtype=torch.bfloat16, logit_scale=3.0)
    _compare(inputs, 5, 1, 1, softmax=True, requires=requires)
    assert "backward" in band_calls


def test_band_non_contiguous(band_calls):
    """Channels-last head views (as a 1x1 conv on a channels-last input produces them) and expanded ghosts."""
    n, c, h, w, k = 2, 16, 17, 18, 5
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(n, h, w, 3 * c, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    v = qkv.permute(0, 3, 1, 2)[:, 2 * c:]
    logits = (torch.randn(n, w, h, k * k, generator=gen) * 3).to(DEVICE, torch.bfloat16).requires_grad_()
    attn = logits.permute(0, 3, 2, 1)
    p_add = torch.randn(1, c, k, k, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    results = []
    for backend, cast in (("triton", lambda t: t), ("reference", lambda t: t.float())):
        out = elsa_softmax_aggregate(cast(v), cast(attn), None, cast(p_add).expand(n, -1, -1, -1), kernel_size=k,
                                     backend=backend)
        grads = torch.autograd.grad((out * 0.5).sum() + out[:, :, 1:, :3].sum(), [qkv, logits, p_add])
        results.append((out, *grads))
    assert band_calls[:2] == ["aggregate", "backward"]
    for name, a, b in zip(("out", "qkv", "logits", "ghost_add"), *results):
        # ghost_add's gradient sums ~600 pixel terms per sample, and each sample's sum is rounded to bfloat16
        # before the expand's backward adds them: an error of the scale of the sums, not of each element.
        atol = 1e-2 * b.abs().max().item() if name == "ghost_add" else 2e-2
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=2e-2, msg=lambda m: f"{name}: {m}")


def test_band_float32_stays_on_cuda_cores(band_calls):
    """float32 runs the CUDA-core kernels (tl.dot would round to TF32) and meets the float32 tolerance."""
    inputs = _inputs(1, 32, 9, 11, 3, 1, False, True)
    assert not band.applies(inputs[0], None, 1)
    _compare(inputs, 3, 1, 1, softmax=True)
    assert band_calls == []


@pytest.mark.parametrize("mul", [True, False], ids=["cuda-core", "tensor-core"])
@pytest.mark.parametrize("logit_scale", [2.0, 4.0], ids=lambda s: f"std{s:g}")
def test_bfloat16_logit_gradient_precision(mul, logit_scale):
    """The logits gradient p * (dp - sum p dp) with logits of realistic spread (std 2-4) in bfloat16: dp must
    stay float32 until the softmax backward (rounded to bfloat16 it exceeded the tolerance)."""
    inputs = _inputs(1, 32, 9, 11, 3, 1, mul, True, dtype=torch.bfloat16, seed=5, logit_scale=logit_scale)
    _compare(inputs, 3, 1, 1, softmax=True, requires=(False, True, False, False))
