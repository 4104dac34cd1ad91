"""Official classification checkpoints as they really are, read with ``weights_only=True``.

The official models were trained by a timm 0.4.9 ``train.py``; its ``CheckpointSaver.save_checkpoint`` writes
``{'epoch', 'arch', 'state_dict', 'optimizer', 'version': 2, 'args': argparse.Namespace, <scaler key>: scaler state,
'state_dict_ema', 'metric'}`` where the scaler key is ``'amp_scaler'`` (native AMP, ``GradScaler.state_dict()``) or
``'amp'`` (apex, ``amp.state_dict()``: ``{'loss_scaler0': {'loss_scale', 'unskipped'}}``). The files here are built
with exactly that structure."""
from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import timm
import torch

import elsa
from elsa.dense.backbone import ELSASwinBackbone
from elsa.models._checkpoint import read_state_dict


def official_train_args() -> argparse.Namespace:
    """The Namespace of an official run: the official README's ELSA-Swin-T command parsed by train.py, plus what
    train.py sets on it (prefetcher, distributed, device, world_size, rank, native/apex amp)."""
    return argparse.Namespace(
        data_dir="/data/imagenet", dataset="", train_split="train", val_split="validation", model="elsa_swin_tiny",
        pretrained=False, initial_checkpoint="", resume="", no_resume_opt=False, num_classes=None, gp=None,
        img_size=None, input_size=None, crop_pct=None, mean=None, std=None, interpolation="", batch_size=128,
        validation_batch_size_multiplier=1, opt="adamw", opt_eps=None, opt_betas=None, momentum=0.9,
        weight_decay=0.05, clip_grad=None, clip_mode="norm", sched="cosine", lr=1e-3, lr_noise=None,
        lr_noise_pct=0.67, lr_noise_std=1.0, lr_cycle_mul=1.0, lr_cycle_limit=1, warmup_lr=1e-6, min_lr=1e-5,
        epochs=300, start_epoch=None, decay_epochs=30.0, warmup_epochs=20, cooldown_epochs=10, patience_epochs=10,
        decay_rate=0.1, no_aug=False, scale=[0.08, 1.0], ratio=[0.75, 1.3333333333333333], hflip=0.5, vflip=0.0,
        color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", aug_splits=0, jsd=False, reprob=0.25, remode="pixel",
        recount=1, resplit=False, mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
        mixup_mode="batch", mixup_off_epoch=0, smoothing=0.1, train_interpolation="random", drop=0.0,
        drop_connect=None, drop_path=0.1, drop_block=None, bn_tf=False, bn_momentum=None, bn_eps=None,
        sync_bn=False, dist_bn="", split_bn=False, model_ema=True, model_ema_force_cpu=False,
        model_ema_decay=0.99992, seed=42, log_interval=50, recovery_interval=0, checkpoint_hist=10, workers=8,
        save_images=False, amp=True, apex_amp=False, native_amp=True, channels_last=False, pin_mem=False,
        no_prefetcher=False, output="", eval_metric="top1", tta=0, local_rank=0, use_multi_epochs_loader=False,
        torchscript=False, finetune="", token_label_data="", prefetcher=True, distributed=True, device="cuda:0",
        world_size=8, rank=0)


def official_classification_file(model: torch.nn.Module, ema: torch.nn.Module, scaler: str) -> dict:
    """timm 0.4.9 CheckpointSaver's save_state for ``model`` after one AdamW step (the optimizer state is real)."""
    params = [p for p in model.parameters()]
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                            lr=1e-3)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # what timm's scheduler adds
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(p.grad is not None for p in params)
    state = {
        "epoch": 299,
        "arch": type(model).__name__.lower(),
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "version": 2,
        "args": official_train_args(),
        "state_dict_ema": ema.state_dict(),
        "metric": 82.7,
    }
    if scaler == "native":
        state["amp_scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 117}
    elif scaler == "apex":
        state["amp"] = OrderedDict(loss_scaler0={"loss_scale": 32768.0, "unskipped": 1729})
    return state


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return timm.create_model("elsa_swin_pico"), timm.create_model("elsa_swin_pico")


@pytest.mark.parametrize("scaler", ["native", "apex", "none"])
def test_official_training_file_loads_with_weights_only(tmp_path, models, scaler):
    model, ema = models
    path = tmp_path / "model_best.pth.tar"
    torch.save(official_classification_file(model, ema, scaler), path)
    raw = read_state_dict(path)  # weights_only=True underneath
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].model == "elsa_swin_tiny"
    for use_ema, source in ((False, model), (True, ema)):
        fresh = timm.create_model("elsa_swin_pico")
        elsa.load_checkpoint(fresh, path, use_ema=use_ema)
        for k, v in source.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
    from elsa.train.engine import _load_initial_checkpoint  # `elsa train --initial-checkpoint`

    started = timm.create_model("elsa_swin_pico")
    _load_initial_checkpoint(started, str(path))
    assert torch.equal(started.head.weight, model.head.weight)
    backbone = ELSASwinBackbone.from_name("elsa_swin_pico", out_indices=(0, 1, 2))
    report = backbone.load_pretrained(path)
    assert {k.split(".")[0] for k in report.missing} == {"norm0", "norm1", "norm2"}  # the backbone's own norms
    assert set(report.unexpected) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_only_plain_types_are_allowed(tmp_path, models):
    """The allow-list holds argparse.Namespace and nothing that runs code: a file with another object is refused."""
    model, ema = models
    state = official_classification_file(model, ema, "native")
    state["args"] = argparse.FileType("r")  # an object, not plain data
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(elsa.models.CheckpointError, match="weights_only"):
        read_state_dict(path)
