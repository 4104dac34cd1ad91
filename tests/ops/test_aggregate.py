"""Every CPU backend of elsa_aggregate against the unfold reference: forward, each gradient, float64 gradcheck."""
import itertools

import pytest
import torch

from elsa.ops import elsa_aggregate, elsa_softmax_aggregate, reference

CPU_BACKENDS = ["reference", "native", "cpp"]
FAST_CPU_BACKENDS = ["native", "cpp"]
GHOSTS = ["none", "mul", "add", "both"]


def make_inputs(n=2, c=3, h=7, w=9, k=3, stride=1, ghosts="both", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = h // stride, w // stride
    v = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    attn = torch.randn(n, k * k, ho, wo, generator=g, dtype=dtype).softmax(1)
    mul = torch.randn(n, c, k, k, generator=g, dtype=dtype) if ghosts in ("mul", "both") else None
    add = torch.randn(n, c, k, k, generator=g, dtype=dtype) * 0.1 if ghosts in ("add", "both") else None
    return v, attn, mul, add


def direct_sum(v, attn, mul, add, k, dilation, stride):
    """The spec's formula written as loops over neighbours: independent of unfold."""
    n, c, h, w = v.shape
    ho, wo = attn.shape[-2:]
    out = torch.zeros(n, c, ho, wo, dtype=v.dtype)
    for i, j in itertools.product(range(k), range(k)):
        for y in range(ho):
            for x in range(wo):
                yy, xx = y * stride + (i - k // 2) * dilation, x * stride + (j - k // 2) * dilation
                if 0 <= yy < h and 0 <= xx < w:
                    m = mul[:, :, i, j] if mul is not None else 1.0
                    d = add[:, :, i, j] if add is not None else 0.0
                    out[:, :, y, x] += v[:, :, yy, xx] * (m * attn[:, i * k + j, y, x, None] + d)
    return out


@pytest.mark.parametrize("k,dilation,stride", [(3, 1, 1), (3, 2, 2), (5, 1, 2), (5, 2, 1)])
@pytest.mark.parametrize("ghosts", GHOSTS)
def test_reference_matches_the_formula(k, dilation, stride, ghosts):
    v, attn, mul, add = make_inputs(k=k, stride=stride, ghosts=ghosts)
    expected = direct_sum(v, attn, mul, add, k, dilation, stride)
    got = reference.aggregate(v, attn, mul, add, k, dilation, stride)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("k,dilation,stride,h,w", [
    (3, 1, 1, 7, 9), (5, 2, 2, 9, 7), (7, 1, 2, 8, 11), (7, 2, 1, 6, 5), (5, 1, 1, 4, 4),
])
@pytest.mark.parametrize("ghosts", GHOSTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_fast_backends_match_reference(backend, k, dilation, stride, h, w, ghosts, dtype):
    v, attn, mul, add = make_inputs(h=h, w=w, k=k, stride=stride, ghosts=ghosts, dtype=dtype, seed=k + h)
    inputs = [t.requires_grad_() for t in (v, attn, mul, add) if t is not None]
    grad_out = torch.randn(v.shape[0], v.shape[1], h // stride, w // stride, dtype=dtype)
    results = {}
    for name in ("reference", backend):
        out = elsa_aggregate(v, attn, mul, add, kernel_size=k, dilation=dilation, stride=stride, backend=name)
        grads = torch.autograd.grad(out, inputs, grad_out)
        results[name] = (out, *grads)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    for got, expected in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("ghosts", GHOSTS)
def test_gradcheck(backend, k, stride, dilation, ghosts):
    v, attn, mul, add = make_inputs(n=1, c=2, h=5, w=4, k=k, stride=stride, ghosts=ghosts, seed=k * 7 + stride)
    args = [t.requires_grad_() for t in (v, attn, mul, add) if t is not None]

    def fn(*ts):
        it = iter(ts)
        vv, aa = next(it), next(it)
        mm = next(it) if mul is not None else None
        dd = next(it) if add is not None else None
        return elsa_aggregate(vv, aa, mm, dd, kernel_size=k, dilation=dilation, stride=stride, backend=backend)

    # Full Jacobians for K=3; for the larger kernels the (equally float64) fast mode keeps the suite quick.
    assert torch.autograd.gradcheck(fn, args, fast_mode=k > 3)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_gradient_only_for_inputs_that_need_it(backend):
    v, attn, mul, add = make_inputs(ghosts="both")
    v.requires_grad_()
    out = elsa_aggregate(v, attn, mul, add, backend=backend)
    (gv,) = torch.autograd.grad(out.sum(), [v])
    expected = torch.autograd.grad(reference.aggregate(v, attn, mul, add, 3, 1, 1).sum(), [v])[0]
    torch.testing.assert_close(gv, expected)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_expanded_ghosts_and_noncontiguous_inputs(backend):
    v, attn, _, _ = make_inputs(n=4, c=3, h=8, w=8, k=3, ghosts="none", dtype=torch.float32)
    base = torch.randn(1, 3, 3, 3)
    add = base.expand(4, -1, -1, -1)  # stride-0 batch axis, as the layer produces
    v_nc = v.transpose(2, 3)  # non-contiguous view
    attn_nc = attn.transpose(2, 3)
    out = elsa_aggregate(v_nc, attn_nc, None, add, backend=backend)
    torch.testing.assert_close(out, reference.aggregate(v_nc.contiguous(), attn_nc.contiguous(), None,
                                                       add.contiguous(), 3, 1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_entry_equals_softmax_then_aggregate(backend):
    v, logits, mul, add = make_inputs(k=5, ghosts="both")
    logits = torch.randn_like(logits) * 3
    got = elsa_softmax_aggregate(v, logits, mul, add, backend=backend)
    torch.testing.assert_close(got, reference.aggregate(v, logits.softmax(1), mul, add, 5, 1, 1))


def test_kernel_size_inferred_from_attn():
    v, attn, mul, add = make_inputs(k=5, ghosts="add")
    torch.testing.assert_close(elsa_aggregate(v, attn, None, add), elsa_aggregate(v, attn, None, add, kernel_size=5))


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_output_dtype_follows_input(backend):
    v, attn, _, add = make_inputs(dtype=torch.float32, ghosts="add")
    assert elsa_aggregate(v, attn, None, add, backend=backend).dtype == torch.float32
    v16, attn16, add16 = (t.to(torch.bfloat16) for t in (v, attn, add))
    out16 = elsa_aggregate(v16, attn16, None, add16, backend=backend)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), reference.aggregate(v, attn, None, add, 3, 1, 1), atol=0.1, rtol=0.05)
