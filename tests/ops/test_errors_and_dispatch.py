"""Bad input gets a clear error naming the argument; backends are chosen by device, argument or ELSA_BACKEND."""
import pytest
import torch

from elsa.ops import BACKENDS, elsa_aggregate, select_backend
from elsa.ops.native import native_aggregate, native_aggregate_backward


def good(k=3, n=2, c=4, h=6, w=6, stride=1, dtype=torch.float32):
    v = torch.randn(n, c, h, w, dtype=dtype)
    attn = torch.rand(n, k * k, h // stride, w // stride, dtype=dtype)
    ghost = torch.randn(n, c, k, k, dtype=dtype)
    return v, attn, ghost


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(kernel_size=4), ValueError, "kernel_size must be odd, got 4"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=-3), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=5), ValueError, r"attn must have kernel_size\*\*2 = 25 channels, got 9"),
    (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    (dict(stride=0), ValueError, "stride must be >= 1, got 0"),
    (dict(dilation=0), ValueError, "dilation must be >= 1, got 0"),
    (dict(backend="cuda-magic"), ValueError, r"backend must be one of \['cpp', 'native', 'reference', 'triton'\]"),
])
def test_bad_arguments(kwargs, exc, pattern):
    v, attn, ghost = good()
    with pytest.raises(exc, match=pattern):
        elsa_aggregate(v, attn, ghost, ghost, **kwargs)


def test_wrong_rank():
    v, attn, ghost = good()
    with pytest.raises(ValueError, match=r"v must have 4 dimensions, got shape \(4, 6, 6\)"):
        elsa_aggregate(v[0], attn)
    with pytest.raises(ValueError, match="attn must have 4 dimensions"):
        elsa_aggregate(v, attn[0])
    with pytest.raises(ValueError, match="ghost_mul must have 4 dimensions"):
        elsa_aggregate(v, attn, ghost[0])


def test_attn_channels_not_square():
    v, _, _ = good()
    with pytest.raises(ValueError, match="attn has 8 channels, which is not a square"):
        elsa_aggregate(v, torch.rand(2, 8, 6, 6))


@pytest.mark.parametrize("attn_shape,pattern", [
    ((3, 9, 6, 6), r"attn must have shape \(N, K\*K, H//stride, W//stride\) = \(2, 9, 6, 6\)"),
    ((2, 9, 5, 6), r"got \(2, 9, 5, 6\)"),
])
def test_mismatched_attn(attn_shape, pattern):
    v, _, _ = good()
    with pytest.raises(ValueError, match=pattern):
        elsa_aggregate(v, torch.rand(attn_shape))


def test_stride_changes_expected_attn_size():
    v, attn, _ = good(h=7, w=9)  # attn is 7x9, but stride 2 needs 3x4
    with pytest.raises(ValueError, match=r"\(2, 9, 3, 4\)"):
        elsa_aggregate(v, attn, stride=2)


@pytest.mark.parametrize("name", ["ghost_mul", "ghost_add"])
def test_mismatched_ghost(name):
    v, attn, ghost = good()
    bad = torch.randn(2, 3, 3, 3)
    kwargs = {"ghost_mul": bad} if name == "ghost_mul" else {"ghost_add": bad}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(N, C, K, K\) = \(2, 4, 3, 3\), got \(2, 3, 3, 3\)"):
        elsa_aggregate(v, attn, **kwargs)


def test_mixed_dtypes_and_integers():
    v, attn, ghost = good()
    with pytest.raises(TypeError, match="attn has dtype torch.float64 but v has dtype torch.float32"):
        elsa_aggregate(v, attn.double())
    with pytest.raises(TypeError, match="ghost_add has dtype torch.float16"):
        elsa_aggregate(v, attn, None, ghost.half())
    with pytest.raises(TypeError, match="v must be a floating-point tensor, got dtype torch.int64"):
        elsa_aggregate(v.long(), attn)
    with pytest.raises(TypeError, match="attn must be a torch.Tensor, got list"):
        elsa_aggregate(v, [1, 2])


def test_mixed_devices():
    v, attn, _ = good()
    with pytest.raises(ValueError, match="attn is on meta but v is on cpu"):
        elsa_aggregate(v, attn.to("meta"))


def test_forced_backend_that_cannot_run_explains_why(monkeypatch):
    v, attn, _ = good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # without the interpreter, Triton needs CUDA tensors
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on tensors on cpu.*needs CUDA tensors"):
        elsa_aggregate(v, attn, backend="triton")


def test_automatic_choice_on_cpu_is_the_compiled_kernel():
    v, _, _ = good()
    assert select_backend(v).name == "cpp"
    assert BACKENDS["reference"].auto_devices == ()


def test_environment_variable_forces_backend(monkeypatch):
    v, attn, ghost = good()
    monkeypatch.setenv("ELSA_BACKEND", "reference")
    assert select_backend(v).name == "reference"
    monkeypatch.setenv("ELSA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="got 'nonsense'"):
        elsa_aggregate(v, attn)
    monkeypatch.setenv("ELSA_BACKEND", "native")  # today's PyTorch path stays one variable away
    assert select_backend(v).name == "native"
    monkeypatch.setenv("ELSA_BACKEND", "auto")
    assert select_backend(v).name == "cpp"
    assert select_backend(v, "reference").name == "reference"  # the argument wins over the variable


def test_opcheck_native_custom_ops():
    v, attn, ghost = good(n=1, c=2, h=5, w=4, dtype=torch.float64)
    for args in [(v, attn, ghost, ghost * 0.5, 3, 1, 1), (v, attn[..., :2, :2], None, ghost, 3, 2, 2)]:
        args = tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(native_aggregate, args)
    grad = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    torch.library.opcheck(native_aggregate_backward, (grad, v, attn, ghost, None, 3, 1, 1, True, True, True, False))


def test_torch_compile_fullgraph_matches_eager():
    v, attn, ghost = good(n=2, c=3, h=7, w=5)
    logits = torch.randn_like(attn)

    def fn(v, logits, ghost):
        return elsa_aggregate(v, logits.softmax(1), None, ghost, kernel_size=3) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (v, logits, ghost)]
    ins_c = [t.clone().requires_grad_() for t in (v, logits, ghost)]
    out, out_c = fn(*ins), compiled(*ins_c)
    torch.testing.assert_close(out_c, out)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(out_c, ins_c, g)):
        torch.testing.assert_close(b, a)
