"""The standard-ops form the ONNX exporters see (ops/decomposed.py) against the reference, and ONNX export of the
layer with both exporters, checked in onnxruntime against eager at other sizes than the traced one."""
import pytest
import torch

from elsa import ELSABlock
from elsa.ops import decomposed, elsa_aggregate, elsa_softmax_aggregate, reference

CASES = [(2, 3, 4, 7, 9, 3, 1, 1), (1, 2, 3, 9, 7, 5, 2, 2), (2, 1, 5, 8, 11, 7, 1, 2), (1, 2, 2, 6, 5, 7, 2, 1)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ghosts", ["none", "mul", "add", "both"])
@pytest.mark.parametrize("softmax", [False, True])
def test_decomposed_matches_reference_forward_and_backward(case, ghosts, softmax):
    b, g, c, h, w, k, dilation, stride = case
    gen = torch.Generator().manual_seed(sum(case))
    ho, wo = h // stride, w // stride
    v = torch.randn(b, g * c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(b, g * k * k, ho, wo, generator=gen, dtype=torch.float64, requires_grad=True)
    mul = torch.randn(g, c, k, k, generator=gen, dtype=torch.float64).requires_grad_() if ghosts in ("mul", "both") else None
    add = torch.randn(g, c, k, k, generator=gen, dtype=torch.float64).requires_grad_() if ghosts in ("add", "both") else None
    inputs = [t for t in (v, logits, mul, add) if t is not None]
    got = decomposed.aggregate(v, logits, mul, add, k, dilation, stride, g, softmax)
    entry = elsa_softmax_aggregate if softmax else elsa_aggregate
    expected = entry(v, logits, mul, add, kernel_size=k, dilation=dilation, stride=stride, num_heads=g,
                     backend="reference")
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, e)


def test_flat_form_with_per_sample_ghosts():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(3, 4, 6, 7, generator=gen)
    attn = torch.randn(3, 9, 6, 7, generator=gen).softmax(1)
    add = torch.randn(3, 4, 3, 3, generator=gen)
    got = decomposed.aggregate(v, attn, None, add.unsqueeze(1), 3, 1, 1, 1, False)
    torch.testing.assert_close(got, reference.aggregate(v, attn, None, add, 3, 1, 1))


def _export_and_run(module, x, others, tmp_path, dynamo):
    import onnxruntime  # the [export] extra (in [dev])

    path = tmp_path / f"block_{'dynamo' if dynamo else 'legacy'}.onnx"
    if dynamo:
        b, h, w = torch.export.Dim("b"), torch.export.Dim("h", min=4), torch.export.Dim("w", min=4)
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes={"x": {0: b, 1: h, 2: w}})
    else:
        torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 1: "h", 2: "w"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for other in others:
        (got,) = session.run(None, {"x": other.numpy()})
        with torch.no_grad():
            expected = module(other)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True])
def test_elsa_block_exports_to_onnx_with_dynamic_batch_and_size(tmp_path, dynamo):
    torch.manual_seed(0)
    block = ELSABlock(32, kernel_size=5, num_heads=4, group_width=8, lam=1, gamma=1).eval()
    x = torch.randn(2, 10, 12, 32)
    others = [torch.randn(1, 9, 13, 32), torch.randn(3, 16, 7, 32)]
    _export_and_run(block, x, others, tmp_path, dynamo)
