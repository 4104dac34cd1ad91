"""FLOP counting: the ELSA op formulas, the MAC convention against published figures, meta-device counting."""
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import elsa.models  # noqa: F401  (registers the models)
from elsa.layers import ELSABlock
from elsa.ops import elsa_aggregate
from elsa.ops.flops import aggregate_macs, count_flops, register_elsa_flop_formulas


class _Aggregate(nn.Module):
    def __init__(self, ghost: bool, k: int = 3, stride: int = 1):
        super().__init__()
        self.ghost, self.k, self.stride = ghost, k, stride
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):  # x: (N, C + K*K, H, W) -> v and attn
        v, a = x[:, :4] * self.scale, x[:, 4:4 + self.k ** 2, ::self.stride, ::self.stride].softmax(1)
        d = torch.ones(x.shape[0], 4, self.k, self.k, device=x.device) if self.ghost else None
        return elsa_aggregate(v, a, None, d, kernel_size=self.k, stride=self.stride, backend="native")


@pytest.mark.parametrize("ghost", [False, True])
def test_aggregate_formula_counts_one_mac_per_output_and_neighbour(ghost):
    model = _Aggregate(ghost, k=3, stride=2)
    macs = count_flops(model, (2, 4 + 9, 10, 10))
    assert macs == 2 * 4 * 5 * 5 * 9 * (2 if ghost else 1) == aggregate_macs((2, 4, 5, 5), 3, ghost)


def test_linear_and_conv_are_counted_as_macs():
    assert count_flops(nn.Linear(8, 16), (1, 3, 5, 8)) == 15 * 8 * 16
    assert count_flops(nn.Conv2d(3, 6, 3, padding=1, bias=False), (2, 3, 7, 7)) == 2 * 6 * 7 * 7 * 3 * 9


def test_backward_counts_one_forward_per_gradient():
    register_elsa_flop_formulas()
    v = torch.randn(2, 4, 6, 6, requires_grad=True)
    a = torch.rand(2, 25, 6, 6, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = elsa_aggregate(v, a, None, None, kernel_size=5, backend="native")
    forward = counter.get_total_flops()
    assert forward == 2 * 2 * 4 * 6 * 6 * 25
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * forward  # grad v and grad attn
    assert v.grad is not None and a.grad is not None


def test_meta_device_count_equals_cpu_count_and_restores_backend_env(monkeypatch):
    monkeypatch.delenv("ELSA_BACKEND", raising=False)
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 24), ELSABlock(24, num_heads=3, kernel_size=5, group_width=4))
    cpu = count_flops(block, (1, 7, 9, 3))
    assert cpu > count_flops(block[0], (1, 7, 9, 3))
    assert count_flops(block.to("meta"), (1, 7, 9, 3)) == cpu
    import os
    assert "ELSA_BACKEND" not in os.environ


def test_triton_ops_get_formulas_when_loaded():
    pytest.importorskip("triton")  # ships with every CUDA torch; the CPU-only venv may lack it
    import elsa.ops.triton.op  # noqa: F401

    covered = register_elsa_flop_formulas()
    assert {"native_aggregate", "triton_aggregate", "triton_softmax_aggregate"} <= set(covered)
    v = torch.empty(2, 4, 6, 6, device="meta")
    a = torch.empty(2, 9, 6, 6, device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.ops.elsa.triton_softmax_aggregate(v, a, None, None, 3, 1, 1)
    assert counter.get_total_flops() == 2 * 2 * 4 * 36 * 9


def test_bad_input_size_is_rejected():
    with pytest.raises(ValueError, match="input_size"):
        count_flops(nn.Linear(2, 2), (3, 224, 224))


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name, size, published", [
    ("swin_tiny_patch4_window7_224", 224, 4.5),   # Swin paper
    ("volo_d1_224", 224, 6.8),                    # VOLO paper
    ("elsa_volo_d1_224", 224, 8.0),               # ELSA paper (derived settings)
    ("elsa_volo_d5_512", 512, 437.0),             # ELSA paper (derived settings)
])
def test_published_gflops_within_5_percent(name, size, published):
    gmacs = count_flops(_meta(name), (1, 3, size, size)) / 1e9
    assert abs(gmacs / published - 1) < 0.05, (name, gmacs)


def test_elsa_swin_tiny_matches_the_spec_4_8_gflops():
    model = timm.create_model("elsa_swin_tiny").to("meta")  # built on CPU: its constructor reads a linspace
    gmacs = count_flops(model) / 1e9
    assert abs(gmacs / 4.8 - 1) < 0.02, gmacs


def test_every_elsa_custom_op_has_a_formula():
    # a new elsa:: op without a formula would silently count 0 FLOPs
    try:
        import elsa.ops.triton.op  # noqa: F401
    except ImportError:
        pass
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("elsa::")}
    assert "native_aggregate" in names
    assert names <= set(register_elsa_flop_formulas())
