"""Loading official and our own checkpoint files: layouts, formats, and the errors for wrong files."""
import pytest
import timm
import torch

import elsa
from elsa.cli.main import main
from elsa.io import save_safetensors
from elsa.models import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_pico").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def outputs_equal(a, b):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def fresh():
    return timm.create_model("elsa_swin_pico").eval()


@pytest.mark.parametrize("layout", ["top", "state_dict", "model", "module_prefix", "timm_train"])
def test_official_pth_layouts(tmp_path, trained, layout):
    sd = trained.state_dict()
    payload = {
        "top": sd,
        "state_dict": {"state_dict": sd, "epoch": 299, "arch": "elsa_swin_pico"},
        "model": {"model": sd},
        "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        # what timm's (and the official) train.py writes: the argparse.Namespace of the run beside the weights
        "timm_train": {"epoch": 10, "arch": "elsa_swin_pico", "state_dict": sd,
                       "args": __import__("argparse").Namespace(lr=1e-3, model="elsa_swin_pico")},
    }[layout]
    path = tmp_path / "official.pth"
    torch.save(payload, path)
    model = fresh()
    assert not outputs_equal(model, trained)
    elsa.load_checkpoint(model, path)
    assert outputs_equal(model, trained)


def test_ema_weights_are_chosen_on_request(tmp_path, trained, caplog):
    other = fresh()
    path = tmp_path / "train.pth"
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": trained.state_dict()}, path)
    model = fresh()
    load_checkpoint(model, path, use_ema=True)
    assert outputs_equal(model, trained)
    load_checkpoint(model, path)
    assert outputs_equal(model, other)
    torch.save({"state_dict": trained.state_dict()}, path)
    load_checkpoint(model, path, use_ema=True)  # no EMA in the file: its regular weights, with a warning
    assert outputs_equal(model, trained)
    assert "has none of ['state_dict_ema', 'model_ema']" in caplog.text


def test_round_trip_through_both_formats(tmp_path, trained):
    pth, st = tmp_path / "m.pth", tmp_path / "m.safetensors"
    torch.save(trained.state_dict(), pth)
    save_safetensors(trained.state_dict(), st)
    for path in (pth, st):
        model = fresh()
        load_checkpoint(model, path)
        assert outputs_equal(model, trained)
        for k, v in trained.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_timm_pretrained_with_file_overlay(tmp_path, trained):
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        if path.suffix == ".pth":
            torch.save({"state_dict": trained.state_dict()}, path)
        else:
            save_safetensors(trained.state_dict(), path)
        model = timm.create_model("elsa_swin_pico", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert outputs_equal(model, trained)


def test_missing_and_unexpected_keys_are_counted_and_named(tmp_path, trained):
    sd = dict(trained.state_dict())
    del sd["head.weight"], sd["head.bias"], sd["norm.weight"]
    sd["extra.thing"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"3 missing keys \(norm.weight, head.weight, head.bias\); "
                                              r"1 unexpected keys \(extra.thing\)"):
        load_checkpoint(fresh(), path)


def test_shape_mismatch_names_key_and_shapes(tmp_path, trained):
    sd = dict(trained.state_dict())
    sd["head.weight"] = torch.zeros(1000, sd["head.weight"].shape[1])
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch for head.weight: checkpoint has \(1000, 128\), "
                                              r"model expects \(10, 128\)"):
        load_checkpoint(fresh(), path)


def test_truncated_and_foreign_files(tmp_path, trained):
    good = tmp_path / "good.pth"
    torch.save(trained.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(fresh(), truncated)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(fresh(), text)
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="is not a valid .safetensors file"):
        load_checkpoint(fresh(), bad_st)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(fresh(), tmp_path / "absent.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": print}, path)
    with pytest.raises(CheckpointError, match="weights_only=True refuses"):
        load_checkpoint(fresh(), path)


def test_convert_command_writes_and_verifies(tmp_path, trained, capsys):
    src, out = tmp_path / "official.pth", tmp_path / "out.safetensors"
    torch.save({"state_dict_ema": trained.state_dict(), "state_dict": fresh().state_dict()}, src)
    assert main(["convert", str(src), str(out), "--model", "elsa_swin_pico", "--use-ema"]) == 0
    assert "reloaded and verified" in capsys.readouterr().out
    model = fresh()
    load_checkpoint(model, out)
    assert outputs_equal(model, trained)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_models_command_lists_params_flops_and_top1(capsys):
    assert main(["models", "elsa_swin_t*", "--json"]) == 0
    import json

    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "elsa_swin_tiny" and row["params_m"] == 29.14 and row["official_top1"] == 82.7
    assert abs(row["gflops"] - 4.8) < 0.1  # spec: 4.8 G
