"""DDP under torchrun: 2 CPU processes (gloo) end with identical parameters, equal (to float tolerance) to one
process trained on the same global batches; rank 0 alone writes the run folder."""
from __future__ import annotations

import torch

from train_helpers import elsa_subprocess, free_port, read_jsonl

# 64 training images, global batch 16: 4 steps per epoch, 2 epochs. No randomness besides the data order
# (no augmentation, no drop-path, no mixup); the DistributedSampler gives 2 ranks of batch 8 the same global
# batches as 1 process of batch 16. SGD, because its update is linear in the gradient: AdamW divides by sqrt(v),
# which turns float-rounding differences of near-zero gradients (summation order) into lr-sized ones.
COMMON = ["train", "digits", "--train-subset", "64", "--val-subset", "30", "--epochs", "2", "--warmup-epochs", "0",
          "--no-aug", "--drop-path", "0", "--smoothing", "0", "--opt", "sgd", "--momentum", "0.9", "--lr", "0.05",
          "--weight-decay", "1e-4", "--clip-grad", "5", "-j", "0", "--seed", "3", "--no-progress"]


def _run(args, launcher=None):
    proc = elsa_subprocess(args, launcher=launcher)
    out, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, out
    return out


def test_two_ranks_match_one_process(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    out2 = _run([*COMMON, "-b", "8", "--output", str(tmp_path), "--experiment", "ddp",
                 "--save-rank-params", str(tmp_path / "ddp_params")], launcher=torchrun)
    _run([*COMMON, "-b", "16", "--output", str(tmp_path), "--experiment", "single",
          "--save-rank-params", str(tmp_path / "single_params")])
    r0 = torch.load(tmp_path / "ddp_params" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp_params" / "rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "single_params" / "rank0.pt", weights_only=True)
    assert r0.keys() == r1.keys() == single.keys()
    init = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)["model"]
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=f"ranks differ at {k}")
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=2e-5, msg=f"DDP != single process at {k}")
        torch.testing.assert_close(r0[k], init[k], rtol=0, atol=0)  # last.pth holds the final weights
    # the runs trained (parameters moved from the seed's initialisation) and rank 0 alone logged epochs
    import timm

    import elsa  # noqa: F401

    torch.manual_seed(3)
    fresh = timm.create_model("elsa_swin_pico").state_dict()
    moved = sum(not torch.equal(fresh[k], r0[k]) for k in r0 if r0[k].is_floating_point())
    assert moved > len(r0) // 2
    rows2 = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    rows1 = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert [r["epoch"] for r in rows2] == [1, 2]
    for a, b in zip(rows2, rows1):  # metrics are reduced over ranks: same numbers as one process
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["val_top1"] - b["val_top1"]) < 1e-6
    assert out2.count("epoch 2/2:") == 1  # the epoch summary is logged by rank 0 only
