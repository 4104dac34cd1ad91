"""Bad data, bad flags and faults, one test per class of problem, through the real CLI (``elsa.cli.main.main``
in-process, or ``python -m elsa`` where a signal is needed) on tiny files the tests write: each must end in
bounded time with exit code 2 (130 for Ctrl-C), ONE line ``elsa CMD: ...`` naming the cause, no traceback, and
no earlier result lost."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import elsa  # noqa: F401 - registers the ELSA models with timm
from elsa.cli.main import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import SUBPROCESS_ENV, make_image_folder  # noqa: E402

MODEL = "elsa_swin_pico"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _train_args(data: Path, out: Path, name: str, *extra: str) -> list:
    return ["train", str(data), "--model", MODEL, "--img-size", "32", "-b", "4", "--epochs", "1",
            "--max-steps-per-epoch", "1", "-j", "0", "--no-progress", "--threads", "1", "--output", str(out),
            "--experiment", name, *extra]


def _error_line(capsys, command: str) -> str:
    """The command's one error line; fails on a traceback or on more than one error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"elsa {command}:")]
    assert len(lines) == 1, err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_input")
    return {"two": make_image_folder(root / "two", per_class=4, size=16),
            "three": make_image_folder(root / "three", classes=("a", "b", "c"), per_class=2, size=16),
            "one": make_image_folder(root / "one", classes=("only",), per_class=4, size=16)}


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory) -> Path:
    """A finished 1-step run on the two-class folder at input 48 (the model's default is 32): its run folder."""
    out = tmp_path_factory.mktemp("runs")
    assert main(_train_args(folders["two"], out, "run", "--img-size", "48")) == 0
    return out / "run"


# ------------------------------------------------------------------------------------------ bad checkpoint files
def _bad_files(folder: Path, marker: Path) -> dict:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = folder / "good.pth"
    torch.save({"model": {"w": torch.randn(3)}}, good)
    files = {"empty": folder / "empty.pth", "truncated": folder / "truncated.pth", "random": folder / "random.pth",
             "malicious": folder / "malicious.pth", "text": folder / "text.pth"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["random"].write_bytes(os.urandom(4096))
    torch.save({"model": Evil()}, files["malicious"])
    files["text"].write_text("not a checkpoint\n")
    return files


CAUSE = {"empty": "is empty", "truncated": "truncated or corrupt", "random": "neither a torch.save file",
         "malicious": "disallowed object", "text": "neither a torch.save file"}


@pytest.mark.parametrize("kind", sorted(CAUSE))
def test_a_bad_checkpoint_file_is_one_line_naming_file_and_cause(kind, folders, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = _bad_files(tmp_path, marker)[kind]
    rc = main(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", MODEL])
    line = _error_line(capsys, "convert")
    assert rc == 2 and str(path) in line and CAUSE[kind] in line, line
    assert not marker.exists(), "the malicious pickle was executed"
    assert not (tmp_path / "out.safetensors").exists()
    # the same reader serves --pretrained-path of `elsa train`
    rc = main(_train_args(folders["two"], tmp_path / "runs", "x", "--pretrained-path", str(path)))
    line = _error_line(capsys, "train")
    assert rc == 2 and "--pretrained-path" in line and CAUSE[kind] in line, line


def test_convert_names_an_unknown_model_and_a_file_of_another_model(trained, tmp_path, capsys):
    assert main(["convert", str(trained / "last.pth"), str(tmp_path / "o.safetensors"), "--model", "nosuch"]) == 2
    assert "--model 'nosuch'" in _error_line(capsys, "convert")
    assert main(["convert", str(trained / "last.pth"), str(tmp_path / "o.safetensors"), "--model",
                 "elsa_swin_tiny"]) == 2
    assert "does not fit --model elsa_swin_tiny" in _error_line(capsys, "convert")


# ------------------------------------------------------------------------------------------------- bad train flags
@pytest.mark.parametrize("flags, named", [
    (["--aa", "garbage"], "--aa"),                       # timm: bare AssertionError
    (["--train-interpolation", "nosuch"], "--train-interpolation"),  # timm: KeyError
    (["--ratio", "0", "0"], "--ratio"),                  # was: every image "unreadable" (math domain error)
    (["--scale", "0.5", "2"], "--scale"),
    (["--smoothing", "2"], "--smoothing"),
    (["--clip-grad", "-1"], "--clip-grad"),              # was: gradients multiplied by a negative factor
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--opt", "nosuch"], "--opt"),
    (["--remode", "nosuch"], "--remode"),
    (["--cutmix", "1", "--cutmix-minmax", "0.5", "0.1"], "--cutmix-minmax"),  # was: "low >= high" mid-step
    (["--sched", "step", "--decay-epochs", "0"], "--decay-epochs"),          # was: ZeroDivisionError traceback
    (["--opt-betas", "0.9"], "--opt-betas"),
    (["--pretrained"], "--pretrained-path"),             # no hosted weights: points at --pretrained-path
    (["--pretrained-path", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
])
def test_a_bad_train_flag_is_one_line_naming_it(flags, named, folders, tmp_path, capsys):
    start = time.monotonic()
    rc = main(_train_args(folders["two"], tmp_path, "run", *flags))
    line = _error_line(capsys, "train")
    assert rc == 2 and named in line, line
    assert not (tmp_path / "run" / "last.pth").exists()
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("text, named", [("warmup_epochs: 0.5\n", "--warmup-epochs must be an integer"),
                                         ("amp: maybe\n", "--amp must be true or false"),
                                         ("lr: fast\n", "--lr must be a number")])
def test_a_config_value_of_the_wrong_type_is_named(text, named, folders, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    rc = main(_train_args(folders["two"], tmp_path, "run", "--config", str(config)))
    line = _error_line(capsys, "train")
    assert rc == 2 and named in line, line


def test_a_malformed_yaml_config_names_file_and_line(folders, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 0.001\nepochs: [1\nfoo: : :\n")
    rc = main(_train_args(folders["two"], tmp_path, "run", "--config", str(config)))
    line = _error_line(capsys, "train")
    assert rc == 2 and str(config) in line and "line 3" in line, line


def test_resume_from_another_model_says_which_architecture(folders, tmp_path, capsys):
    foreign = tmp_path / "other.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": {}, "epoch": 1, "arch": "resnet18",
                "num_classes": 7, "args": {"model": "resnet18"}}, foreign)
    rc = main(_train_args(folders["two"], tmp_path, "run", "--resume", str(foreign)))
    line = _error_line(capsys, "train")
    assert rc == 2 and "resnet18" in line and MODEL in line, line
    assert "size mismatch" not in capsys.readouterr().err


def test_resume_with_other_classes_is_one_line(trained, folders, tmp_path, capsys):
    rc = main(_train_args(folders["three"], tmp_path, "run", "--resume", str(trained / "last.pth")))
    line = _error_line(capsys, "train")
    assert rc == 2 and "2-class" in line and "3 classes" in line, line


# ------------------------------------------------------------------------------------------------ degenerate data
def test_one_class_data_warns_and_top5_is_reported_as_topk(folders, tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="elsa.train"):
        assert main(_train_args(folders["one"], tmp_path, "one")) == 0
    assert "single class ('only')" in caplog.text and "means nothing" in caplog.text
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1")]
    assert epoch_lines and "top-5" not in epoch_lines[0] and "top-1" in epoch_lines[0], epoch_lines


def test_a_transform_error_is_an_option_error_not_an_unreadable_image(folders):
    from elsa.data import ImageFolderDataset, SkipUnreadable, TransformError

    def broken(img):
        raise ZeroDivisionError("float division by zero")

    dataset = SkipUnreadable(ImageFolderDataset(folders["two"] / "train", transform=broken))
    with pytest.raises(TransformError, match="augmentation options"):
        dataset[0]
    assert not dataset.warned  # nothing was counted or warned as unreadable


def test_a_corrupt_token_label_file_is_named(tmp_path):
    from elsa.data.token_label import load_label_map

    bad = tmp_path / "img_001.pt"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="img_001.pt"):
        load_label_map(bad)


# ----------------------------------------------------------------------------------------- earlier runs are kept
def test_a_finished_run_is_never_overwritten_without_overwrite(trained, folders, caplog):
    import logging

    caplog.set_level(logging.INFO)
    out = trained.parent
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    assert main(_train_args(folders["two"], out, "run", "--img-size", "48", "--seed", "7")) == 0
    assert "already holds a run" in caplog.text and "run-1" in caplog.text
    caplog.clear()
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    assert (out / "run-1" / "model.safetensors").is_file()
    # --overwrite replaces it; a temporary file left by a killed writer is removed, and the log says so
    stale = out / "run-1" / ".last.pth.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1000)
    assert main(_train_args(folders["two"], out, "run-1", "--img-size", "48", "--overwrite")) == 0
    assert not stale.exists() and "removed 1 temporary file" in caplog.text and "run-2" not in caplog.text
    assert not (out / "run-2").exists()


def test_model_safetensors_holds_the_best_epoch_with_classes_and_data_config(trained):
    from safetensors import safe_open

    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        head = f.get_tensor("head.weight")
    assert meta["weights"] == "best" and meta["arch"] == MODEL
    assert json.loads(meta["classes"]) == ["cat", "dog"]
    assert json.loads(meta["data_config"])["input_size"] == [3, 48, 48]
    best = torch.load(trained / "best.pth", weights_only=True)
    assert int(meta["epoch"]) == best["best_epoch"]
    torch.testing.assert_close(head, best["model"]["head.weight"], rtol=0, atol=0)


# -------------------------------------------------------------------------- the checkpoint's config is the default
@pytest.mark.parametrize("weights", ["best.pth", "model.safetensors"])
def test_validate_uses_the_checkpoints_input_size_and_classes(weights, trained, folders, tmp_path, capsys, caplog):
    results = tmp_path / "r.json"
    assert main(["validate", str(folders["two"]), "--model", MODEL, "--checkpoint", str(trained / weights), "-j",
                 "0", "--no-progress", "--results-file", str(results), "--threads", "1"]) == 0
    r = json.loads(results.read_text())
    assert r["input_size"] == [3, 48, 48] and r["topk"] == 2  # as trained, not the model's default 32
    # an explicit --img-size is allowed and the log says which is used
    assert main(["validate", str(folders["two"]), "--model", MODEL, "--checkpoint", str(trained / weights), "-j",
                 "0", "--no-progress", "--img-size", "40", "--results-file", str(results)]) == 0
    assert json.loads(results.read_text())["input_size"] == [3, 40, 40]
    assert "instead of the checkpoint's [3, 48, 48]" in caplog.text
    # a folder with other classes is an error naming both sets, not a positional mapping
    rc = main(["validate", str(folders["three"]), "--model", MODEL, "--checkpoint", str(trained / weights), "-j",
               "0", "--no-progress"])
    line = _error_line(capsys, "validate")
    assert rc == 2 and "'a'" in line and "'cat'" in line, line


def test_validate_leaves_out_and_counts_an_unreadable_image(trained, folders, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folders["two"] / "val", data / "val")
    bad = sorted((data / "val" / "cat").iterdir())[1]
    bad.write_bytes(b"not an image")
    results = tmp_path / "r.json"
    assert main(["validate", str(data), "--model", MODEL, "--checkpoint", str(trained / "best.pth"), "-j", "0",
                 "--no-progress", "--results-file", str(results)]) == 0
    r = json.loads(results.read_text())
    assert r["skipped"] == 1 and r["num_images"] == 7  # left out, not replaced by a neighbour scored twice


def test_predict_names_classes_from_model_safetensors_and_goes_on_past_a_bad_file(trained, folders, tmp_path,
                                                                                  capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = sorted((folders["two"] / "val" / "dog").iterdir())[0]
    rc = main(["predict", str(bad), str(good), "--model", MODEL, "--checkpoint", str(trained / "model.safetensors"),
               "--json", "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2 and "error" in out[0] and {c["name"] for c in out[1]["topk"]} == {"cat", "dog"}


# ----------------------------------------------------------------------------------------------- environment faults
def test_a_full_disk_says_so_and_where(trained, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(trained / "last.pth"), str(out), "--model", MODEL]) == 2
    line = _error_line(capsys, "convert")
    assert "no space left on device" in line and str(out) in line, line
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_of_a_file_that_is_not_metrics_is_one_line(trained, tmp_path, capsys):
    assert main(["plot", str(trained / "model.safetensors")]) == 2
    assert "not a metrics file" in _error_line(capsys, "plot")
    other = tmp_path / "x.jsonl"
    other.write_text('{"a": 1}\n')
    assert main(["plot", str(other)]) == 2
    assert "not a metrics file" in _error_line(capsys, "plot")


def test_a_missing_optional_package_names_the_extra_to_install():
    from elsa.cli._common import describe_error

    err = ModuleNotFoundError("No module named 'pycocotools'", name="pycocotools")
    assert "pip install 'elsa[det]'" in describe_error(err)
    err = ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript")
    assert "pip install 'elsa[export]'" in describe_error(err)


def test_every_compute_command_takes_threads():
    from elsa.cli.main import build_parser

    parser = build_parser()
    for cmd in (["predict", "x.png"], ["validate", "d"], ["visualize", "x.png"], ["export", "x.onnx"],
                ["convert", "a", "b"], ["benchmark"], ["train"]):
        extra = ["--model", MODEL, "--checkpoint", "c"] if cmd[0] in ("predict", "validate", "visualize") else \
            ["--model", MODEL] if cmd[0] == "convert" else []
        try:
            ns = parser.parse_args([*cmd, *extra, "--threads", "1"])
        except SystemExit:
            pytest.fail(f"elsa {cmd[0]} does not take --threads")
        assert getattr(ns, "threads", None) == 1, cmd


def test_ctrl_c_during_training_prints_the_resume_command(folders, tmp_path):
    cmd = [sys.executable, "-m", "elsa", *_train_args(folders["two"], tmp_path, "run")]
    cmd[cmd.index("--epochs") + 1] = "1000"
    proc = subprocess.Popen(cmd, env=dict(os.environ, **SUBPROCESS_ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "epoch 2/1000" in line:
                break
            assert time.monotonic() < deadline, "no second epoch in time"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("elsa train: interrupted") and f"elsa train --resume {tmp_path / 'run' / 'last.pth'}" \
        in last, last


def test_visualize_many_pixels_is_a_grid_not_one_endless_row(trained, folders, tmp_path):
    from PIL import Image

    image = sorted((folders["two"] / "val" / "cat").iterdir())[0]
    out = tmp_path / "attn.png"
    pixels = [f"{i},{i}" for i in range(2, 42, 4)]  # 10 pixels of the 48x48 input
    assert main(["visualize", str(image), "--model", MODEL, "--checkpoint", str(trained / "model.safetensors"),
                 "--pixels", *pixels, "--out", str(out), "--threads", "1"]) == 0
    width, height = Image.open(out).size
    # one row would be (1 + 2 * 10) panels of 2.3 in at 100 dpi = 4830 px; 4 pixels per band: 9 panels
    assert width <= 9 * 230 + 10 and height > width * 0.6, (width, height)
