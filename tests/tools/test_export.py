"""`elsa export`: ONNX with both exporters and torch.export programs, written whole and checked against eager."""
import subprocess
import sys

import onnx
import pytest
import timm
import torch

import elsa  # noqa: F401
from elsa.tools.export import export_model


@pytest.mark.parametrize("fmt,exporter", [("onnx", "torchscript"), ("onnx", "dynamo"), ("pt2", "dynamo")])
def test_export_runs_at_another_batch_size_like_eager(tmp_path, fmt, exporter):
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico", num_classes=7)
    report = export_model(model, tmp_path / f"pico.{fmt}", fmt, img_size=32, batch=2, exporter=exporter)
    assert report.max_abs_diff < 1e-4
    if fmt == "onnx":
        graph = onnx.load(report.path).graph
        assert not [n.op_type for n in graph.node if n.domain.startswith("elsa")]  # standard ops only
    else:
        program = torch.export.load(report.path)
        assert any("elsa." in str(n.target) for n in program.graph.nodes)  # keeps the fast custom op
        x = torch.randn(5, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,exporter,traced,checked", [("onnx", "torchscript", 32, 72), ("pt2", "dynamo", 40, 72)])
def test_export_with_dynamic_height_and_width(tmp_path, fmt, exporter, traced, checked):
    """Height and width dynamic too: checked at another size (and batch). The TorchScript-based exporter is traced
    where the last map is one window and checked where it is larger (the window stage must then shift)."""
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico", num_classes=7)
    report = export_model(model, tmp_path / f"pico.{fmt}", fmt, img_size=traced, batch=2, exporter=exporter,
                          dynamic_size=True, check_size=checked)
    assert report.max_abs_diff < 1e-4
    with pytest.raises(ValueError, match="check_size"):
        export_model(model, tmp_path / "other.onnx", "onnx", img_size=32, check_size=40)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_elsa_volo_exports_to_onnx_like_eager(tmp_path, exporter):
    """ELSA-VOLO (the ELSA stage inside timm's VOLO), the smallest configuration with every part: both exporters,
    checked in onnxruntime at another batch size."""
    torch.manual_seed(0)
    model = timm.create_model("elsa_volo_d1_224", img_size=32, num_classes=5, layers=(1, 1, 1, 1),
                              embed_dims=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), stem_hidden_dim=16, elsa_kernel=5)
    report = export_model(model, tmp_path / "volo.onnx", "onnx", img_size=32, batch=2, exporter=exporter)
    assert report.max_abs_diff < 1e-4
    assert not [n.op_type for n in onnx.load(report.path).graph.node if n.domain.startswith("elsa")]


def test_cli_exports_a_checkpoint_and_reports_bad_input(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("elsa_swin_pico", num_classes=4)
    ckpt = tmp_path / "pico.safetensors"
    save_file(model.state_dict(), str(ckpt))
    out = tmp_path / "out" / "pico.onnx"
    run = lambda *a: subprocess.run([sys.executable, "-m", "elsa.cli.main", "export", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    done = run("elsa_swin_pico", "--checkpoint", str(ckpt), "--output", str(out), "--exporter", "torchscript")
    assert done.returncode == 0, done.stderr
    assert "max |difference| from eager" in done.stdout and out.is_file()
    assert [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim][1] == 4
    bad = run("no_such_model")
    assert bad.returncode == 2 and "--model: unknown model 'no_such_model'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run("elsa_swin_pico", "--checkpoint", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and "nope.pth" in missing.stderr and "Traceback" not in missing.stderr
