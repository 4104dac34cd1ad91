"""End to end through ``elsa seg``: train a tiny ELSA-Swin UPerNet on synthetic ADE-style data (with a corrupt image
and an image without annotation), test it (slide), predict a PNG, resume."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from elsa.cli import seg as seg_cli
from synthetic_ade import NUM_CLASSES, make_synthetic_ade

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "group_width": 4, ' \
       '"elsa_kernel": 3, "window_size": 4, "patch_size": 4, "drop_path_rate": 0.0}'
ITERS = 250
SMALL = ["--recipe", "upernet_elsa_swin_tiny_160k", "--backbone", "custom", "--backbone-kwargs", TINY,
         "--num-classes", str(NUM_CLASSES), "--head-channels", "32", "--aux-channels", "16",
         "--img-scale", "256,64", "--crop-size", "48", "--device", "cpu"]


def cli(argv):
    parser = argparse.ArgumentParser()
    seg_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["seg", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("ade")
    ade = make_synthetic_ade(root, num_train=64, num_val=12, size=(48, 64), seed=0)
    (ade / "images" / "training" / "ADE_train_99999998.jpg").write_bytes(b"garbage")   # unreadable
    Image.new("L", (8, 8)).save(ade / "annotations" / "training" / "ADE_train_99999998.png")
    (ade / "images" / "training" / "ADE_train_99999999.jpg").write_bytes(
        (ade / "images" / "training" / "ADE_train_00000000.jpg").read_bytes())       # no annotation
    out = tmp_path_factory.mktemp("run")
    rc = cli(["train", *SMALL, "--data", str(root), "--output", str(out), "--iters", str(ITERS), "--lr", "3e-3",
              "--warmup-iters", "20", "--batch-size", "8", "--workers", "0", "--ckpt-interval", "125",
              "--eval-interval", str(ITERS), "--log-interval", "25"])
    assert rc == 0
    return root, out


@pytest.mark.slow
def test_tiny_model_learns_synthetic_ade(trained):
    root, out = trained
    result = json.loads((out / "eval_latest.json").read_text())
    # Chance level: predicting background everywhere gives mIoU ~0.15 (background IoU ~0.6, three classes at 0).
    # 0.55 needs background and at least two shape classes segmented well. Measured 0.852 on the 2-core CPU
    # (background 0.97, rectangle 0.90, disc 0.85, triangle 0.70; slide 0.899, ms-flip 0.909).
    assert result["mIoU"] > 0.55 and result["aAcc"] > 0.85
    assert result["iter"] == ITERS and result["num_images"] == 12
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == ITERS and log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["skipped_samples"] > 0          # the corrupt image was met and skipped, not fatal
    assert (out / "iter_125.pth").is_file() and (out / "iter_250.pth").is_file()


def test_seg_test_slide_and_predict(trained, tmp_path, capsys):
    root, out = trained
    whole = json.loads((out / "eval_latest.json").read_text())
    js = tmp_path / "slide.json"
    assert cli(["test", *SMALL, "--checkpoint", str(out / "latest.pth"), "--data", str(root), "--mode", "slide",
                "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "aAcc" in printed
    slide = json.loads(js.read_text())
    # 48 px windows (stride 32) over the ~64-85 px test images: real sliding, as good as whole-image inference
    assert slide["mode"] == "slide" and len(slide["IoU"]) == NUM_CLASSES and slide["num_images"] == 12
    assert slide["mIoU"] > 0.55 and abs(slide["mIoU"] - whole["mIoU"]) < 0.15
    img = root / "ADEChallengeData2016" / "images" / "validation" / "ADE_valid_00000000.jpg"
    png = tmp_path / "pred.png"
    assert cli(["predict", str(img), *SMALL, "--checkpoint", str(out / "latest.pth"), "--out", str(png),
                "--no-legend"]) == 0
    overlay = np.asarray(Image.open(png))
    assert overlay.shape == np.asarray(Image.open(img)).shape
    # by default a legend panel of the classes present sits right of the unchanged overlay
    assert cli(["predict", str(img), *SMALL, "--checkpoint", str(out / "latest.pth"), "--out", str(png)]) == 0
    with_legend = np.asarray(Image.open(png))
    assert with_legend.shape[1] > overlay.shape[1] and with_legend.shape[0] >= overlay.shape[0]
    assert (with_legend[:overlay.shape[0], :overlay.shape[1]] == overlay).all()
    assert cli(["predict", str(img), *SMALL, "--checkpoint", str(out / "latest.pth"),
                "--out", str(tmp_path / "x.jpg")]) == 2          # not a PNG: clear error, no crash


def test_resume_restores_iteration_and_optimizer(trained):
    root, out = trained
    rc = cli(["train", *SMALL, "--data", str(root), "--output", str(out), "--iters", str(ITERS + 5), "--lr", "3e-3",
              "--warmup-iters", "20", "--batch-size", "8", "--workers", "0", "--ckpt-interval", "125",
              "--eval-interval", "1000", "--log-interval", "5", "--resume"])
    assert rc == 0
    ckpt = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == ITERS + 5 and ckpt["scheduler"]["last_epoch"] == ITERS + 5
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {ITERS + 5}                     # AdamW moments continued, not restarted
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == ITERS + 5 and ckpt["recipe"]["iters"] == ITERS + 5


def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP through torchrun (gloo on CPU): process group from env vars, DistributedSampler, sharded evaluation with
    all-reduced histograms, checkpoints and JSON from rank 0 only."""
    import os
    import signal
    import subprocess
    import sys

    make_synthetic_ade(tmp_path / "data", num_train=8, num_val=3, size=(40, 48), seed=3)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "elsa.cli.seg", "train", *SMALL, "--data", str(tmp_path / "data"), "--output", str(out),
           "--iters", "4", "--batch-size", "2", "--workers", "0", "--ckpt-interval", "4", "--eval-interval", "4",
           "--log-interval", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # torchrun and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("final: mIoU") == 1                      # rank 0 reports once
    result = json.loads((out / "eval_latest.json").read_text())
    assert result["num_images"] == 3                              # 2 + 1 images from the two ranks, summed
    assert "batch 2 x 2 processes" in stderr
    ckpt = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 4


def test_sigkill_mid_run_then_resume_finishes(tmp_path, kill_after_checkpoint):
    """A run killed with SIGKILL after its first checkpoint leaves whole checkpoints; --resume ends the schedule
    with the optimizer state carried over, and every periodic snapshot loads."""
    import sys

    make_synthetic_ade(tmp_path / "data", num_train=8, num_val=2, size=(40, 48), seed=4)
    out = tmp_path / "run"
    common = [*SMALL, "--data", str(tmp_path / "data"), "--output", str(out), "--iters", "60", "--batch-size", "2",
              "--workers", "0", "--ckpt-interval", "4", "--eval-interval", "1000", "--log-interval", "4"]
    kill_after_checkpoint([sys.executable, "-m", "elsa.cli.seg", "train", *common], out / "latest.pth")
    killed = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert 4 <= killed["iteration"] < 60 and killed["iteration"] % 4 == 0
    assert cli(["train", *common, "--resume"]) == 0
    final = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 60 and final["scheduler"]["last_epoch"] == 60
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {60}
    snapshots = sorted(out.glob("iter_*.pth"))
    assert len(snapshots) == 15 and all(
        torch.load(p, map_location="cpu", weights_only=True)["iteration"] == int(p.stem[5:]) for p in snapshots)
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["iter"] == 60
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_amp_bf16_on_cpu_trains(tmp_path, caplog):
    """--amp-dtype bfloat16 autocasts on the CPU too (float16 is CUDA's, with the grad scaler)."""
    import logging

    make_synthetic_ade(tmp_path / "data", num_train=4, num_val=2, size=(40, 48), seed=5)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="elsa.engine"):
        assert cli(["train", *SMALL, "--data", str(tmp_path / "data"), "--output", str(out), "--iters", "3",
                    "--batch-size", "2", "--workers", "0", "--eval-interval", "3", "--amp-dtype", "bfloat16"]) == 0
    assert "autocast bfloat16, grad scaler off" in caplog.text
    ckpt = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["recipe"]["amp_dtype"] == "bfloat16"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    result = json.loads((out / "eval_latest.json").read_text())
    assert result["iter"] == 3 and 0.0 <= result["aAcc"] <= 1.0
