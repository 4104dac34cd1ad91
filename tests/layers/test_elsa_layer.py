"""The ELSA layer and block: ghost-head variants, stride and dilation, and agreement with the operator."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from elsa import ELSA, ELSABlock
from elsa.ops import reference
from tests.dispatch_count import CountOps


@pytest.mark.parametrize("lam,gamma,shape", [
    (1, 1, (2, 1, 24, 5, 5)), (0, 1, (1, 24, 5, 5)), (1, 0, (1, 24, 5, 5)), (0, 0, None),
])
def test_ghost_head_variants(lam, gamma, shape):
    layer = ELSA(24, num_heads=3, kernel_size=5, lam=lam, gamma=gamma)
    if shape is None:
        assert layer.ghost_head is None
    else:
        assert tuple(layer.ghost_head.shape) == shape
    assert layer(torch.randn(2, 9, 7, 24)).shape == (2, 9, 7, 24)


def test_ghost_initialisation_follows_the_spec():
    torch.manual_seed(0)
    layer = ELSA(96, num_heads=3, kernel_size=7, lam=1, gamma=1)
    mul, add = layer.ghost_head[0], layer.ghost_head[1]
    assert 0.9 < mul.std() < 1.1  # standard normal
    assert 0.015 < add.std() < 0.025  # timm trunc_normal_(std=.02): cut at +-2 absolute, as the official code


def test_qk_width_rule():
    assert ELSA(96, 3, group_width=4).dim_qk == 64
    assert ELSA(100, 4, group_width=8).dim_qk == 72  # 66 rounded up to a multiple of 8


def functional_elsa(layer, x):
    """The layer's computation spelled out with the reference operator (spec section 2)."""
    b, h, w, c = x.shape
    g, k = layer.num_heads, layer.kernel_size
    t = layer.pre_proj(x.permute(0, 3, 1, 2))
    q, kk, v = t.split((layer.dim_qk, layer.dim_qk, layer.dim_v), 1)
    hp = q * kk * layer.scale
    if layer.stride > 1:
        hp = F.avg_pool2d(hp, layer.stride)
    a = layer.attn(hp)
    ho, wo = a.shape[-2:]
    a = a.reshape(b * g, k * k, ho, wo).softmax(1)
    gh = layer.ghost_head
    mul = add = None
    if layer.lam and layer.gamma:
        mul, add = gh[0] ** layer.lam, gh[1] * layer.gamma
    elif layer.lam:
        mul = gh ** layer.lam
    elif layer.gamma:
        add = gh * layer.gamma
    expand = lambda t: None if t is None else t.expand(b, -1, -1, -1).reshape(b * g, c // g, k, k)  # noqa: E731
    out = reference.aggregate(v.reshape(b * g, c // g, h, w), a, expand(mul), expand(add), k, layer.dilation, layer.stride)
    return layer.post_proj(out.reshape(b, c, ho, wo).permute(0, 2, 3, 1))


@pytest.mark.parametrize("lam,gamma", [(1, 1), (0, 1), (2, 0.5), (0, 0)])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_layer_equals_its_definition(lam, gamma, stride, dilation):
    torch.manual_seed(1)
    layer = ELSA(24, num_heads=2, kernel_size=3, stride=stride, dilation=dilation, lam=lam, gamma=gamma,
                 group_width=4, qkv_bias=True).eval()
    x = torch.randn(2, 10, 9, 24)
    out = layer(x)
    assert out.shape == (2, 10 // stride, 9 // stride, 24)
    torch.testing.assert_close(out, functional_elsa(layer, x), atol=1e-5, rtol=1e-5)


def test_attention_dropout_path_is_used_in_training():
    layer = ELSA(16, num_heads=2, kernel_size=3, group_width=4, attn_drop=0.5).train()
    x = torch.randn(1, 6, 6, 16)
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x))  # dropout after the softmax changes the output
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_block_is_a_drop_in_residual_module():
    block = ELSABlock(32, num_heads=4, kernel_size=5, group_width=8, drop_path=0.1)
    net = nn.Sequential(block, ELSABlock(32, num_heads=2, kernel_size=3, group_width=8))
    x = torch.randn(2, 11, 13, 32, requires_grad=True)
    y = net(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert block.mlp.fc1.out_features == 96  # MLP ratio 3 by default, as the official block


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int, got 4"):
        ELSA(16, 2, kernel_size=4)
    with pytest.raises(ValueError, match=r"dim_v \(16\) must be divisible by num_heads \(3\)"):
        ELSA(16, 3)


def test_autocast_keeps_one_dtype_for_the_operator():
    """Under bf16 autocast the ghost parameters stay float32; the layer hands the op a single dtype."""
    torch.manual_seed(0)
    block = ELSABlock(16, num_heads=2, kernel_size=3, group_width=4, lam=1, gamma=1).eval()
    x = torch.randn(2, 6, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = block(x)
    torch.testing.assert_close(low.float(), block(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["cpp", "native"])
@pytest.mark.parametrize("lam,gamma,stride", [(1, 1, 1), (0, 1, 2), (1, 0, 1)])
def test_layer_backends_agree_with_reference_forward_and_backward(backend, lam, gamma, stride):
    torch.manual_seed(2)
    layer = ELSA(24, num_heads=3, kernel_size=5, stride=stride, lam=lam, gamma=gamma, group_width=4,
                 qkv_bias=True).eval()
    x = torch.randn(2, 9, 11, 24, dtype=torch.float64)
    layer = layer.double()
    results = {}
    for name in ("reference", backend):
        layer.backend = name
        xi = x.clone().requires_grad_()
        out = layer(xi)
        grads = torch.autograd.grad(out, [xi, *layer.parameters()], torch.ones_like(out))
        results[name] = (out, *grads)
    for got, expected in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, expected)


def test_layer_forward_makes_no_layout_copies():
    """The projection's output goes to the operator and the operator's output to the next projection as they
    are: no clone, contiguous copy or reshape copy anywhere in the layer (there were four per call)."""
    layer = ELSA(96, num_heads=3, kernel_size=7, lam=0, qkv_bias=True, qk_scale=1.0).eval()
    x = torch.randn(2, 14, 13, 96)
    with torch.no_grad(), CountOps() as mode:
        layer(x)
    assert "elsa.cpp_aggregate" in mode.ops
    copies = [op for op in mode.ops if op.split(".")[-1] in ("clone", "copy_", "contiguous", "_to_copy", "expand")]
    assert copies == []
    assert "aten.mul" in mode.ops  # q * k, and no multiplication by the scale of 1
    assert mode.ops.count("aten.mul") == 1


def test_cpu_inference_fuses_the_conv_and_gelu_with_the_same_result():
    torch.manual_seed(3)
    layer = ELSA(48, num_heads=3, kernel_size=5, lam=1, gamma=1, group_width=8).eval()
    x = torch.randn(2, 9, 10, 48)
    with torch.no_grad(), CountOps() as mode:
        fused = layer(x)
    assert "mkldnn._convolution_pointwise" in mode.ops
    with CountOps() as mode:  # with autograd: the plain convolution and GELU
        plain = layer(x)
    assert "mkldnn._convolution_pointwise" not in mode.ops and "aten.gelu" in mode.ops
    torch.testing.assert_close(fused, plain.detach(), atol=1e-5, rtol=1e-5)
