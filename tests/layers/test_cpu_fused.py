"""oneDNN's fused linear (+ bias, + GELU) in CPU float32 inference: same values as the eager ops, taken only where it
is safe (no autograd, no autocast, no tracing), and the modules keep timm's parameters and state_dict."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from torch.profiler import ProfilerActivity, profile

from elsa import ELSABlock
from elsa.layers import cpu_fused

pytestmark = pytest.mark.skipif(not (cpu_fused._HAS_FUSED_LINEAR and torch.backends.mkldnn.is_available()),
                                reason="this torch build has no oneDNN fused linear")


def fused_calls(fn) -> int:
    """How many oneDNN fused linears ``fn()`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_the_eager_ops(gelu, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 9, 40, generator=g).transpose(1, 2)  # 4-D and not contiguous
    w = torch.randn(24, 40, generator=g) / 6
    b = torch.randn(24, generator=g) if bias else None
    expected = F.linear(x, w, b)
    expected = F.gelu(expected) if gelu else expected
    with torch.no_grad():
        assert fused_calls(lambda: cpu_fused.linear(x, w, b, gelu=gelu)) == 1
        got = cpu_fused.linear(x, w, b, gelu=gelu)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_autograd_autocast_and_other_dtypes_take_the_eager_ops():
    x = torch.randn(5, 16)
    lin = nn.Linear(16, 8)
    assert fused_calls(lambda: cpu_fused.linear(x, lin.weight, lin.bias)) == 0  # parameters want gradients
    out = cpu_fused.linear(x, lin.weight, lin.bias, gelu=True)
    out.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_calls(lambda: cpu_fused.linear(x, lin.weight, lin.bias)) == 0
            assert cpu_fused.linear(x, lin.weight, lin.bias).dtype == torch.bfloat16  # autocast still applies
        assert fused_calls(lambda: cpu_fused.linear(x.double(), lin.weight.double(), lin.bias.double())) == 0


def test_mlp_keeps_timm_state_dict_and_values():
    torch.manual_seed(0)
    timm_mlp = TimmMlp(32, 96).eval()
    mlp = cpu_fused.Mlp(32, 96).eval()
    assert mlp.state_dict().keys() == timm_mlp.state_dict().keys()
    mlp.load_state_dict(timm_mlp.state_dict())
    x = torch.randn(2, 5, 6, 32)
    with torch.inference_mode():
        assert fused_calls(lambda: mlp(x)) == 2
        torch.testing.assert_close(mlp(x), timm_mlp(x), rtol=1e-5, atol=1e-5)
    # a changed parameter is used at once (nothing is prepacked or cached)
    with torch.no_grad():
        mlp.fc1.weight.mul_(-0.5)
        timm_mlp.fc1.weight.mul_(-0.5)
        torch.testing.assert_close(mlp(x), timm_mlp(x), rtol=1e-5, atol=1e-5)


def test_mlp_with_another_activation_is_timm_mlp():
    mlp = cpu_fused.Mlp(8, 16, act_layer=nn.ReLU).eval()
    with torch.no_grad():
        assert fused_calls(lambda: mlp(torch.randn(3, 8))) == 0


def test_elsa_block_inference_matches_the_training_path():
    """The block in CPU float32 inference (fused linears, fused conv + GELU) against the same block with autograd
    on (every eager op)."""
    torch.manual_seed(0)
    block = ELSABlock(64, kernel_size=7, num_heads=2, mlp_ratio=4, qkv_bias=True, lam=0).eval()
    x = torch.randn(2, 11, 9, 64)
    expected = block(x)
    assert expected.requires_grad
    with torch.inference_mode():
        assert fused_calls(lambda: block(x)) == 5  # pre_proj, logits, post_proj, fc1 + GELU, fc2
        got = block(x)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
