"""Options: the official README command parses verbatim, recipes match the spec, precedence of the sources."""
from __future__ import annotations

import pytest

from elsa.cli.train import options_from_args
from elsa.train import build_config, list_recipes, load_recipe, validate_config

from train_helpers import train_parser

README_TINY = ("train /data/imagenet --model elsa_swin_tiny --epochs 300 -b 128 -j 8 --opt adamw --lr 1e-3 "
               "--sched cosine --weight-decay 5e-2 --warmup-epochs 20 --warmup-lr 1e-6 --min-lr 1e-5 "
               "--drop-path 0.1 --aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1. --remode pixel --reprob 0.25 "
               "--clip-grad 5. --amp")


def config_of(argv: str):
    args = train_parser().parse_args(argv.split())
    return build_config(options_from_args(args))


def test_readme_command_parses_verbatim():
    cfg = config_of(README_TINY + " --model-ema --model-ema-decay 0.9999 --smoothing 0.1 --img-size 224 "
                    "--crop-pct 0.9 --interpolation bicubic --seed 1 --output /tmp/o --no-prefetcher "
                    "--num-classes 1000 --apex-amp --amp-dtype bfloat16 --device cpu --workers 2")
    assert cfg.data == "/data/imagenet" and cfg.model == "elsa_swin_tiny"
    assert (cfg.epochs, cfg.batch_size, cfg.opt, cfg.lr, cfg.sched, cfg.weight_decay) == (300, 128, "adamw", 1e-3,
                                                                                           "cosine", 0.05)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr, cfg.drop_path) == (20, 1e-6, 1e-5, 0.1)
    assert (cfg.aa, cfg.mixup, cfg.cutmix, cfg.remode, cfg.reprob, cfg.clip_grad) == (
        "rand-m9-mstd0.5-inc1", 0.8, 1.0, "pixel", 0.25, 5.0)
    assert cfg.amp and cfg.apex_amp and cfg.amp_dtype == "bfloat16" and cfg.model_ema
    assert (cfg.model_ema_decay, cfg.img_size, cfg.crop_pct, cfg.interpolation) == (0.9999, 224, 0.9, "bicubic")
    assert (cfg.workers, cfg.seed, cfg.num_classes, cfg.no_prefetcher, cfg.device) == (2, 1, 1000, True, "cpu")
    assert cfg.recipe is None  # a data folder without --recipe: plain defaults + flags
    validate_config(cfg)


@pytest.mark.parametrize("variant,drop_path,ema", [("tiny", 0.1, False), ("small", 0.3, False), ("base", 0.5, True)])
def test_in1k_recipes_match_the_official_recipe(variant, drop_path, ema):
    r = load_recipe(f"elsa_swin_{variant}_in1k")
    assert r["model"] == f"elsa_swin_{variant}"
    assert r["opt"] == "adamw" and r["lr"] == 1e-3 and r["batch_size"] * 8 == r["lr_base_size"] == 1024
    assert (r["sched"], r["epochs"], r["warmup_epochs"], r["warmup_lr"], r["min_lr"]) == ("cosine", 300, 20, 1e-6,
                                                                                          1e-5)
    assert (r["weight_decay"], r["drop_path"], r["aa"]) == (0.05, drop_path, "rand-m9-mstd0.5-inc1")
    assert (r["mixup"], r["cutmix"], r["reprob"], r["remode"], r["clip_grad"], r["amp"]) == (0.8, 1.0, 0.25, "pixel",
                                                                                             5.0, True)
    assert r["model_ema"] is ema
    assert (r["img_size"], r["crop_pct"], r["interpolation"]) == (224, 0.9, "bicubic")


def test_recipes_listed_and_unknown_recipe_rejected():
    assert {"digits", "elsa_swin_tiny_in1k", "elsa_swin_small_in1k", "elsa_swin_base_in1k"} <= set(list_recipes())
    with pytest.raises(ValueError, match="not a built-in recipe"):
        load_recipe("nope")


def test_no_data_means_digits_recipe():
    cfg = config_of("train")
    assert cfg.recipe == "digits" and cfg.model == "elsa_swin_pico" and cfg.data == "digits"


def test_precedence_defaults_recipe_config_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nweight-decay: 0.01\nlr: 0.5\n")
    cfg = config_of(f"train --recipe elsa_swin_small_in1k --config {f} --lr 0.25")
    assert cfg.model == "elsa_swin_small"  # recipe
    assert cfg.epochs == 7 and cfg.weight_decay == 0.01  # config file over recipe
    assert cfg.lr == 0.25  # flag over config file
    assert cfg.momentum == 0.9  # default


def test_in1k_recipe_needs_data():
    with pytest.raises(ValueError, match="pass DATA"):
        validate_config(config_of("train --recipe elsa_swin_base_in1k"))


def test_config_file_errors(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown option.*epochz"):
        config_of(f"train --config {f}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_of(f"train --config {tmp_path / 'missing.yaml'}")


@pytest.mark.parametrize("flag,match", [("--batch-size 0", "--batch-size"), ("--epochs -1", "--epochs"),
                                        ("--drop-path 1.5", "--drop-path"), ("--warmup-epochs 20 --epochs 5",
                                                                             "--warmup-epochs"),
                                        ("--clip-grad -1", "--clip-grad must be > 0"),
                                        ("--weight-decay -1", "--weight-decay must be >= 0"),
                                        ("--lr 1e-3 --min-lr 1e-2", "--min-lr must be <= --lr"),
                                        ("--smoothing 2", r"--smoothing must be in \[0, 1\)"),
                                        ("--hflip 1.5", r"--hflip must be in \[0, 1\]")])
def test_bad_values_name_the_option(flag, match):
    with pytest.raises(ValueError, match=match):
        validate_config(config_of("train " + flag))


@pytest.mark.parametrize("name", list_recipes())
def test_every_builtin_recipe_builds_a_valid_config(name):
    cfg = config_of(f"train /data/somewhere --recipe {name}")
    assert cfg.recipe == name
    validate_config(cfg)


def test_config_file_numbers_written_as_yaml_text_work_as_the_flags_do(tmp_path):
    """PyYAML reads `lr: 1e-3` as the string '1e-3'; the file must mean what `--lr 1e-3` means."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nmin_lr: 1e-6\nepochs: 3\nweight_decay: 5e-2\n")
    cfg = config_of(f"train --config {path}")
    assert (cfg.lr, cfg.min_lr, cfg.epochs, cfg.weight_decay) == (1e-3, 1e-6, 3, 0.05)
    assert isinstance(cfg.epochs, int)
    validate_config(cfg)
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match="--lr must be a number, got 'fast'"):
        config_of(f"train --config {path}")
