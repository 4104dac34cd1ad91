"""Checkpoints: atomic files that load with weights_only=True, a SIGKILLed run resumes to the end, and a resumed
run continues exactly as an uninterrupted one (model, optimizer, schedule, EMA, step and RNG restored)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from elsa.checkpoint import CheckpointError
from train_helpers import ENTRY, read_jsonl, run_train

TINY = ["digits", "--train-subset", "64", "--val-subset", "40", "-b", "16", "--warmup-epochs", "0", "-j", "0",
        "--no-progress"]


def _load_all_checkpoints(run_dir: Path) -> dict:
    loaded = {}
    for f in sorted(run_dir.iterdir()):
        if f.name.endswith(".pth"):
            loaded[f.name] = torch.load(f, map_location="cpu", weights_only=True)  # never half-written
    return loaded


def test_sigkill_mid_epoch_then_resume(tmp_path, kill_after_checkpoint):
    out, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    kill_after_checkpoint([sys.executable, *ENTRY, "train", *TINY, "--epochs", "5", "--output", str(out),
                           "--experiment", "r"], run_dir / "last.pth", after_s=0.3)
    killed = _load_all_checkpoints(run_dir)
    assert "last.pth" in killed and 1 <= killed["last.pth"]["epoch"] < 5

    assert run_train(["--resume", str(run_dir / "last.pth"), "--no-progress"]) == 0  # options from the checkpoint
    final = _load_all_checkpoints(run_dir)
    assert final["last.pth"]["epoch"] == 5 and final["last.pth"]["iteration"] == 5 * 4
    assert final["best.pth"]["epoch"] == final["last.pth"]["best_epoch"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert max(r["val_top1"] for r in rows) == pytest.approx(final["last.pth"]["best_top1"])
    assert (run_dir / "model.safetensors").is_file()
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert all(not name.endswith(".pth") for name in leftovers)


def test_resume_continues_exactly(tmp_path):
    """2 epochs straight == 1 epoch, then --resume for the 2nd (with EMA, random-shift augmentation, grad clip)."""
    common = [*TINY, "--epochs", "2", "--model-ema", "--model-ema-decay", "0.9", "--clip-grad", "1",
              "--output", str(tmp_path)]
    assert run_train([*common, "--experiment", "straight"]) == 0
    assert run_train([*common, "--experiment", "split", "--stop-after-epochs", "1"]) == 0
    first = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert first["epoch"] == 1
    assert not (tmp_path / "split" / "model.safetensors").exists()  # not finished yet
    assert run_train(["--resume", str(tmp_path / "split" / "last.pth")]) == 0
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"]
    for key in ("model", "model_ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    assert read_jsonl(tmp_path / "straight" / "metrics.jsonl")[1]["train_loss"] == pytest.approx(
        read_jsonl(tmp_path / "split" / "metrics.jsonl")[1]["train_loss"], rel=1e-6)


def test_resume_rejects_a_weights_only_file(tmp_path, capsys):
    f = tmp_path / "w.pth"
    torch.save({"head.weight": torch.zeros(1)}, f)
    assert run_train([*TINY, "--epochs", "1", "--resume", str(f)]) == 2
    err = capsys.readouterr().err
    assert "elsa train: error: --resume file" in err and "not an `elsa train` checkpoint" in err
    half = tmp_path / "half.pth"
    half.write_bytes(b"PK\x03\x04 truncated")
    assert run_train([*TINY, "--epochs", "1", "--resume", str(half)]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert issubclass(CheckpointError, RuntimeError)


def test_initial_checkpoint_loads_weights_and_keeps_a_new_head(tmp_path, caplog):
    import logging

    import timm
    from safetensors.torch import load_file

    import elsa  # noqa: F401

    torch.manual_seed(123)
    source = timm.create_model("elsa_swin_pico", num_classes=5)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "init.pth")
    with caplog.at_level(logging.INFO):
        rc = run_train(["digits", "--train-subset", "16", "--val-subset", "10", "-b", "16", "-j", "0", "--epochs", "1",
                        "--lr", "1e-12", "--warmup-lr", "1e-12", "--min-lr", "1e-12", "--initial-checkpoint",
                        str(tmp_path / "init.pth"), "--output", str(tmp_path), "--experiment", "i", "--no-progress"])
    assert rc == 0 and "head.weight" in caplog.text
    trained = load_file(str(tmp_path / "i" / "model.safetensors"))
    assert trained["head.weight"].shape == (10, source.num_features)
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-6, msg=k)
