"""The head-aware entry (num_heads) on every CPU backend, and what is particular to the compiled ``cpp`` backend:
channels-last strides read without copies, bfloat16, determinism, opcheck, torch.compile, fallback to native."""
import logging

import pytest
import torch

import elsa.ops as ops
from elsa.ops import elsa_aggregate, elsa_softmax_aggregate, reference
from elsa.ops.cpp import build
from elsa.ops.cpp.op import cpp_aggregate, cpp_aggregate_backward

GHOSTS = ["none", "mul", "add", "both"]


def projection_output(b, heads, c, h, w, k, stride, ghosts, dtype=torch.float64, seed=0):
    """v and logits as a channels-last projection writes them: strided slices of (B, H, W, X) buffers."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = h // stride, w // stride
    qkv = torch.randn(b, h, w, 5 + heads * c, generator=g, dtype=dtype)  # v is the last G*C of a wider buffer
    v = qkv[..., 5:].permute(0, 3, 1, 2)
    logits = (torch.randn(b, ho, wo, heads * k * k, generator=g, dtype=dtype) * 3).permute(0, 3, 1, 2)
    mul = torch.randn(heads, c, k, k, generator=g, dtype=dtype) if ghosts in ("mul", "both") else None
    add = torch.randn(heads, c, k, k, generator=g, dtype=dtype) * 0.1 if ghosts in ("add", "both") else None
    return v, logits, mul, add


def flat_reference(v, logits, mul, add, heads, k, dilation, stride, softmax):
    """The head-aware operator re-derived by hand: split heads into the batch, one ghost per sample, unfold."""
    b, gc, h, w = v.shape
    ho, wo = logits.shape[-2:]
    vf = v.reshape(b, heads, gc // heads, h, w).reshape(b * heads, gc // heads, h, w)
    af = logits.reshape(b * heads, k * k, ho, wo)
    af = af.softmax(1) if softmax else af
    mf, df = (None if t is None else t.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * heads, -1, k, k)
              for t in (mul, add))
    return reference.aggregate(vf, af, mf, df, k, dilation, stride).reshape(b, gc, ho, wo)


CASES = [  # (b, heads, c, h, w, k, dilation, stride): odd sizes, K close to the map, stride 2, dilation 2, C = 32
    (2, 3, 4, 7, 9, 3, 1, 1),
    (1, 2, 3, 5, 6, 5, 1, 1),
    (2, 2, 5, 9, 7, 5, 2, 2),
    (1, 3, 2, 8, 11, 7, 1, 2),
    (2, 1, 32, 6, 5, 7, 2, 1),
    (1, 2, 32, 7, 7, 7, 1, 1),
]


@pytest.mark.parametrize("backend", ["native", "cpp", "reference"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ghosts", GHOSTS)
@pytest.mark.parametrize("softmax", [False, True])
def test_head_entry_matches_flattened_reference(backend, case, ghosts, softmax):
    b, heads, c, h, w, k, dilation, stride = case
    v, logits, mul, add = projection_output(b, heads, c, h, w, k, stride, ghosts, seed=sum(case))
    inputs = [t.requires_grad_() for t in (v, logits, mul, add) if t is not None]
    entry = elsa_softmax_aggregate if softmax else elsa_aggregate
    got = entry(v, logits, mul, add, kernel_size=k, dilation=dilation, stride=stride, num_heads=heads,
                backend=backend)
    expected = flat_reference(v, logits, mul, add, heads, k, dilation, stride, softmax)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    for g_got, g_exp in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("ghosts", GHOSTS)
@pytest.mark.parametrize("softmax", [False, True])
def test_cpp_head_entry_gradcheck(ghosts, softmax):
    v, logits, mul, add = projection_output(2, 2, 3, 5, 4, 3, 1, ghosts, seed=3)
    inputs = [t.requires_grad_() for t in (v, logits, mul, add) if t is not None]

    def fn(*ts):
        it = iter(ts)
        vv, ll = next(it), next(it)
        mm = next(it) if mul is not None else None
        dd = next(it) if add is not None else None
        return cpp_aggregate(vv, ll, mm, dd, 3, 1, 1, 2, softmax)

    assert torch.autograd.gradcheck(fn, inputs)


def test_cpp_reads_projection_strides_and_writes_channels_last():
    v, logits, _, add = projection_output(2, 3, 32, 9, 8, 7, 1, "add", dtype=torch.float32)
    assert not v.is_contiguous() and v.stride(1) == 1
    out = elsa_softmax_aggregate(v, logits, None, add, num_heads=3, backend="cpp")
    assert out.permute(0, 2, 3, 1).is_contiguous()  # what the output projection reads, without a copy
    torch.testing.assert_close(out, flat_reference(v, logits, None, add, 3, 7, 1, 1, True), atol=1e-5, rtol=1e-5)


def test_flat_entry_keeps_the_input_memory_format():
    v = torch.randn(3, 4, 6, 7)
    attn = torch.randn(3, 9, 6, 7).softmax(1)
    out = elsa_aggregate(v, attn, backend="cpp")
    assert out.is_contiguous()
    out_cl = elsa_aggregate(v.contiguous(memory_format=torch.channels_last), attn, backend="cpp")
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)


@pytest.mark.parametrize("ghosts", ["add", "both"])
def test_cpp_bfloat16_against_float32_reference(ghosts):
    v, logits, mul, add = projection_output(2, 2, 32, 9, 7, 7, 1, ghosts, dtype=torch.float32, seed=5)
    to16 = [None if t is None else t.to(torch.bfloat16).requires_grad_() for t in (v, logits, mul, add)]
    to32 = [None if t is None else t.detach().float().requires_grad_() for t in to16]  # same rounded values
    got = elsa_softmax_aggregate(*to16, num_heads=2, backend="cpp")
    expected = flat_reference(*to32, 2, 7, 1, 1, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(expected)
    live16 = [t for t in to16 if t is not None]
    live32 = [t for t in to32 if t is not None]
    for g16, g32 in zip(torch.autograd.grad(got, live16, grad.to(torch.bfloat16)),
                        torch.autograd.grad(expected, live32, grad)):
        assert g16.dtype == torch.bfloat16
        scale = g32.abs().max()
        torch.testing.assert_close(g16.float() / scale, g32 / scale, atol=2e-2, rtol=0)


FLOAT32_CASES = [  # C = 32, float32: the register-blocked kernels. The first four take the fused backward (grad_v
    # scattered in pass 1, blocks of 8 rows in two phases: 20 and 27 output rows give 3 and 4 blocks); dilation 2
    # with K = 7 (2 * 3 * 2 >= 9) and stride 1 takes the two-pass backward.
    (2, 3, 20, 11, 7, 1, 1),
    (1, 2, 27, 9, 5, 1, 1),
    (2, 2, 41, 13, 7, 1, 2),
    (1, 1, 6, 5, 7, 1, 1),
    (1, 2, 19, 10, 7, 2, 1),
]


@pytest.mark.parametrize("case", FLOAT32_CASES)
@pytest.mark.parametrize("ghosts", GHOSTS)
def test_cpp_float32_32_channels_against_float64_reference(case, ghosts):
    b, heads, h, w, k, dilation, stride = case
    v, logits, mul, add = projection_output(b, heads, 32, h, w, k, stride, ghosts, seed=sum(case))
    exact = [t.requires_grad_() for t in (v, logits, mul, add) if t is not None]
    live = [t.detach().float().requires_grad_() for t in exact]
    it = iter(live)
    args32 = [next(it) if t is not None else None for t in (v, logits, mul, add)]
    got = elsa_softmax_aggregate(*args32, kernel_size=k, dilation=dilation, stride=stride, num_heads=heads,
                                 backend="cpp")
    expected = flat_reference(v, logits, mul, add, heads, k, dilation, stride, True)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    for g_got, g_exp in zip(torch.autograd.grad(got, live, grad.float()), torch.autograd.grad(expected, exact, grad)):
        scale = g_exp.abs().max()
        torch.testing.assert_close(g_got.double() / scale, g_exp / scale, atol=1e-5, rtol=0)


def test_cpp_gradients_do_not_depend_on_the_thread_count():
    v, logits, mul, add = projection_output(3, 2, 32, 20, 9, 5, 1, "both", dtype=torch.float32, seed=9)
    inputs = [t.requires_grad_() for t in (v, logits, mul, add)]
    grad = torch.randn(3, 64, 20, 9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = elsa_softmax_aggregate(v, logits, mul, add, num_heads=2, backend="cpp")
            results.append(torch.autograd.grad(out, inputs, grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_opcheck_cpp_custom_ops():
    v, logits, mul, add = projection_output(2, 2, 3, 5, 4, 3, 1, "both", seed=1)
    for args in [(v, logits, mul, add, 3, 1, 1, 2, True), (v, logits[..., :2, :2], None, add, 3, 2, 2, 2, False)]:
        args = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(cpp_aggregate, args)
    grad = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    torch.library.opcheck(cpp_aggregate_backward,
                          (grad, v, logits, mul, add, 3, 1, 1, 2, True, True, True, True, False))


def test_torch_compile_fullgraph_through_the_cpp_op():
    v, logits, _, add = projection_output(2, 2, 4, 7, 5, 3, 1, "add", dtype=torch.float32)

    def fn(v, logits, add):
        return elsa_softmax_aggregate(v, logits, None, add, num_heads=2).permute(0, 2, 3, 1) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ins = [t.detach().clone().requires_grad_() for t in (v, logits, add)]
    ins_c = [t.detach().clone().requires_grad_() for t in (v, logits, add)]
    out, out_c = fn(*ins), compiled(*ins_c)
    torch.testing.assert_close(out_c, out)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(out_c, ins_c, g)):
        torch.testing.assert_close(b, a)


def test_head_entry_errors_name_the_argument():
    v, logits, _, add = projection_output(1, 2, 3, 5, 5, 3, 1, "add", dtype=torch.float32)
    with pytest.raises(ValueError, match="v must have a multiple of num_heads = 4 channels, got 6"):
        elsa_aggregate(v, logits, num_heads=4)
    with pytest.raises(ValueError, match=r"ghost_add must have shape \(G, C, K, K\) = \(2, 3, 3, 3\)"):
        elsa_aggregate(v, logits, None, add.expand(1, -1, -1, -1, -1)[0, :1], num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        elsa_aggregate(v, logits, num_heads=0)


def test_without_the_compiled_kernel_native_runs_and_the_reason_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(build, "load", lambda: None)
    monkeypatch.setattr(build, "_failure", "the compiled CPU kernel is unavailable (no C++ compiler found)")
    monkeypatch.setattr(ops, "_logged_reasons", set())
    v = torch.randn(2, 3, 5, 5)
    attn = torch.randn(2, 9, 5, 5).softmax(1)
    with caplog.at_level(logging.INFO, logger="elsa.ops"):
        for _ in range(3):
            assert ops.select_backend(v).name == "native"
            out = elsa_aggregate(v, attn)
    assert sum("no C++ compiler found" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(out, reference.aggregate(v, attn, None, None, 3, 1, 1))
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run.*no C\\+\\+ compiler found"):
        elsa_aggregate(v, attn, backend="cpp")


def test_float16_falls_back_to_native():
    v = torch.randn(1, 2, 5, 5, dtype=torch.float16)
    assert ops.select_backend(v).name == "native"


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("ELSA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "compiler", lambda: "/bin/false")
    build.load.cache_clear()
    try:
        assert build.load() is None
        assert "failed" in build.failure() or "unavailable" in build.failure()
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no half-written library left behind
    finally:
        build.load.cache_clear()
        monkeypatch.undo()
        assert build.load() is not None
