"""elsa.engine on a toy regression: epoch- and iteration-based schedules, hook order, exact resume from a
checkpoint, the non-finite-loss check, the AMP policy, and the shared recipe and checkpoint rules."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from elsa.checkpoint import (CheckpointError, CheckpointNotFoundError, load_checkpoint, load_training_checkpoint,
                             read_checkpoint, save_training_checkpoint)
from elsa.engine import (CheckpointHook, Hook, Runtime, StepOutput, Trainer, TrainState, amp_dtype, unwrap_model)
from elsa.engine.optim import linear_warmup, param_groups
from elsa.engine.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: linear_warmup(it, 4, 0.1))
    ds = _data()
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler)
    return model, TrainState(model, opt, sched), loader


def _step(model, batch) -> StepOutput:
    x, y = batch
    return StepOutput({"loss": ((model(x).squeeze(1) - y) ** 2).mean()}, len(x))


class _Record(Hook):
    def __init__(self):
        self.calls = []

    def before_train(self, t):
        self.calls.append("train")

    def before_epoch(self, t):
        self.calls.append(f"epoch{t.state.epoch}")

    def after_step(self, t):
        self.calls.append(t.state.iteration)

    def after_epoch(self, t):
        self.calls.append(f"/epoch{t.state.epoch}")

    def after_train(self, t):
        self.calls.append("/train")


def test_epoch_and_iteration_schedules_and_hook_order():
    model, state, loader = _setup()
    rec = _Record()
    trainer = Trainer(Runtime(), state, model, loader, _step, max_epochs=2, hooks=[rec]).fit()
    assert (state.epoch, state.iteration) == (2, 10)
    assert rec.calls == ["train", "epoch0", 1, 2, 3, 4, 5, "/epoch1", "epoch1", 6, 7, 8, 9, 10, "/epoch2", "/train"]
    assert trainer.epoch_stats["steps"] == 5 and trainer.epoch_stats["samples"] == 10
    assert state.scheduler.last_epoch == 10  # torch schedulers step once per iteration

    model, state, loader = _setup()
    rec = _Record()
    Trainer(Runtime(), state, model, loader, _step, max_iters=7, hooks=[rec]).fit()
    assert (state.epoch, state.iteration) == (2, 7)  # the partial second epoch counts as run
    assert rec.calls[-3:] == [7, "/epoch2", "/train"]

    model, state, loader = _setup()
    Trainer(Runtime(), state, model, loader, _step, max_epochs=3, steps_per_epoch=2).fit()
    assert (state.epoch, state.iteration) == (3, 6)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    model, state, loader = _setup()
    Trainer(Runtime(), state, model, loader, _step, max_epochs=3).fit()

    model2, state2, loader2 = _setup()
    Trainer(Runtime(), state2, model2, loader2, _step, max_epochs=3, stop_epoch=1,
            hooks=[CheckpointHook(tmp_path / "last.pth", every_epochs=1)]).fit()
    model3, state3, loader3 = _setup(seed=5)  # other initial weights: all must come from the file
    assert state3.load_state_dict(load_training_checkpoint(tmp_path / "last.pth"), Runtime())
    assert (state3.epoch, state3.iteration) == (1, 5)
    Trainer(Runtime(), state3, model3, loader3, _step, max_epochs=3).fit()
    for a, b in zip(model.parameters(), model3.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert state3.optimizer.state_dict()["state"][0]["step"] == 15


def test_non_finite_loss_is_an_error_naming_where():
    model, state, loader = _setup()

    def bad(m, batch):
        out = _step(m, batch)
        return StepOutput({"loss": out.losses["loss"] * float("nan"), "part": out.losses["loss"]}, 2)

    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, iteration 0 \(part="):
        Trainer(Runtime(), state, model, loader, bad, max_iters=3).fit()


def test_batches_without_readable_samples_are_counted_not_trained():
    model, state, loader = _setup()

    def sometimes(m, batch):
        return StepOutput(None, 0, skipped=2) if float(batch[0][0, 0]) > 0 else _step(m, batch)

    trainer = Trainer(Runtime(), state, model, loader, sometimes, max_epochs=1).fit()
    assert state.iteration + trainer.epoch_stats["skipped"] / 2 == 5 and trainer.skipped_total > 0


def test_amp_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype(False, cuda) is None
    assert amp_dtype(True, cuda) == torch.float16 and amp_dtype(True, cuda, "bfloat16") == torch.bfloat16
    assert amp_dtype(True, cpu) == torch.bfloat16  # float16 autocast is CUDA's
    assert amp_dtype(True, cpu, cpu=False) is None  # detection/segmentation recipes: fp16 on GPUs only
    with pytest.raises(ValueError, match="--amp-dtype"):
        amp_dtype(True, cpu, "float8")
    assert Runtime(amp_dtype=torch.bfloat16).grad_scaler() is None  # loss scaling only for fp16 on CUDA


def test_unwrap_model_and_param_groups():
    inner = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    holder = nn.Module()
    holder.module = inner
    outer = nn.Module()
    outer._orig_mod = holder
    assert unwrap_model(outer) is inner and unwrap_model(inner) is inner
    decay, no_decay = param_groups(inner, 0.05, ("1.",))
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 2 and no_decay["weight_decay"] == 0.0


@dataclasses.dataclass(frozen=True)
class _Toy(Recipe):
    name: str = "toy"
    sizes: tuple = (1, 2)
    lr: float = 0.1


def test_recipe_is_frozen_and_strict():
    r = _Toy()
    with pytest.raises(ValueError, match=r"unknown _Toy field\(s\) \['lrr'\]"):
        r.replace(lrr=1.0)
    with pytest.raises(ValueError, match="'extra'"):
        _Toy.from_dict({"name": "x", "extra": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.lr = 1.0
    d = r.replace(lr=0.5).to_dict()
    d["sizes"] = list(d["sizes"])  # as JSON gives it back
    assert _Toy.from_dict(d) == r.replace(lr=0.5)


def test_checkpoint_rules(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="--resume file") as err:
        load_training_checkpoint(tmp_path / "absent.pth")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    # a checkpoint of the first `elsa train` version resumes under today's names
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    old = {"state_dict": model.state_dict(), "state_dict_ema": model.state_dict(), "optimizer": {}, "epoch": 2,
           "global_step": 8}
    torch.save(old, tmp_path / "old.pth")
    ckpt = load_training_checkpoint(tmp_path / "old.pth")
    assert ckpt["iteration"] == 8 and set(ckpt["model"]) == {"weight", "bias"} and "model_ema" in ckpt
    # DDP and torch.compile prefixes are stripped; the file is written atomically and read with weights_only
    save_training_checkpoint({"model": {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}},
                             tmp_path / "wrapped.pth")
    fresh = nn.Linear(3, 2)
    load_checkpoint(fresh, tmp_path / "wrapped.pth")
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    assert read_checkpoint(tmp_path / "wrapped.pth")["version"] == 2
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(CheckpointError, match="1 missing keys"):
        load_checkpoint(nn.Sequential(nn.Linear(3, 2)), {"0.weight": model.weight.detach()})


class _Draw:
    """A transform with its own generator, as the segmentation pipeline's."""

    def __init__(self):
        import random

        self.rng = random.Random(0)

    def reseed(self, seed: int) -> None:
        import random

        self.rng = random.Random(seed)

    def __call__(self, i):
        return self.rng.random()


class _Drawn(torch.utils.data.Dataset):
    def __init__(self):
        self.transform = _Draw()

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return (torch.tensor(self.transform(i)),)  # a (sample,) tuple, as the wrapper expects


def test_seed_worker_gives_each_worker_its_own_reproducible_stream():
    from elsa.data import SkipUnreadable
    from elsa.engine import seed_worker

    def draws(seed):
        torch.manual_seed(seed)  # the loader's base seed comes from the main torch RNG (saved by the train state)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(SkipUnreadable(_Drawn()), range(8)),
                                             batch_size=1, num_workers=2, worker_init_fn=seed_worker,
                                             collate_fn=lambda b: float(b[0][0]))
        return [x for x in loader]

    a, b, c = draws(0), draws(0), draws(1)
    assert a == b and a != c
    assert a[0] != a[1]  # workers 0 and 1 take turns: without reseeding both would start from Random(0)
