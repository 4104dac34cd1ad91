"""Training configuration: one flat set of options with defaults, built-in recipes, YAML config files.

Why flat: the options are timm's train.py options (the official ELSA README's flags map one to one), so a YAML
file, a recipe and the command line all speak the same names. Precedence: defaults < recipe < --config file <
flags given on the command line.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainConfig:
    """Every option of ``elsa train``; field names are the command line flags with ``-`` as ``_``."""

    # data
    data: Optional[str] = None  # folder with train/ and val/, "digits", or a timm spec (torch/cifar10); None: digits
    data_dir: Optional[str] = None  # root for timm specs (download/cache folder)
    dataset_download: bool = False
    train_subset: Optional[int] = None  # first n training samples only (quick runs, tests)
    val_subset: Optional[int] = None
    # model
    model: str = "elsa_swin_pico"
    pretrained: bool = False
    pretrained_path: Optional[str] = None
    initial_checkpoint: Optional[str] = None
    resume: Optional[str] = None
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    drop: float = 0.0
    drop_path: Optional[float] = None
    grad_checkpointing: bool = False
    sync_bn: bool = False
    # loader
    batch_size: int = 128
    validation_batch_size: Optional[int] = None
    workers: int = 4
    pin_mem: bool = False
    no_prefetcher: bool = False
    # optimizer
    opt: str = "adamw"
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    # schedule
    sched: str = "cosine"
    lr: float = 1e-3
    lr_base_size: Optional[int] = None  # lr is for this global batch; scaled linearly to the actual one
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    epochs: int = 100
    warmup_epochs: int = 0
    cooldown_epochs: int = 0
    decay_epochs: float = 30.0
    decay_rate: float = 0.1
    sched_on_updates: bool = False  # official (timm 0.4 train.py): the LR changes once per epoch
    # augmentation and regularisation
    no_aug: bool = False
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    aa: Optional[str] = None
    train_interpolation: str = "random"
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.1
    digits_shift: int = 3
    # token labeling (ELSA-VOLO): on when token_label_dir is given
    token_label_dir: Optional[str] = None  # <dir>/<image file stem>.pt, (2, K, S, S) [scores, class indices]
    token_label_size: Optional[int] = None  # token grid of the dense targets (default: img_size // 16)
    dense_weight: float = 0.5
    mix_token: bool = True
    # EMA
    model_ema: bool = False
    model_ema_decay: float = 0.99992
    model_ema_warmup: bool = False
    # precision and device
    amp: bool = False
    amp_dtype: str = "float16"
    apex_amp: bool = False
    device: Optional[str] = None
    threads: Optional[int] = None  # torch CPU threads per process (default: torch's choice)
    # run
    seed: int = 42
    output: Optional[str] = None  # parent folder of run folders (default ./output/train)
    experiment: Optional[str] = None  # run folder name (default: date-model-size)
    overwrite: bool = False  # replace a run already in output/experiment (default: a new NAME-N folder)
    log_interval: int = 50
    log_tensorboard: bool = False
    progress: bool = True
    stop_after_epochs: Optional[int] = None  # end this run early; the schedule still spans --epochs
    max_steps_per_epoch: Optional[int] = None  # hidden: stop each epoch early (tests)
    save_rank_params: Optional[str] = None  # hidden: folder where every rank saves its final params (DDP test)
    recipe: Optional[str] = None
    config: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def list_recipes() -> List[str]:
    """Names of the built-in recipes (files ``elsa/train/recipes/*.yaml``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _read_yaml(path: os.PathLike, what: str) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file {str(path)!r} is not a UTF-8 text file: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} file {str(path)!r} must hold a mapping of option: value, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"{what} file {str(path)!r} has unknown option(s) {unknown}; known options are the "
                         f"`elsa train` flags with '-' written as '_'")
    return values


def load_recipe(name: str) -> Dict[str, Any]:
    """The options of a built-in recipe, e.g. ``elsa_swin_tiny_in1k`` or ``digits``."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--recipe {name!r} is not a built-in recipe; choose one of {list_recipes()}")
    return _read_yaml(path, "recipe")


def load_config_file(path: os.PathLike) -> Dict[str, Any]:
    """The options of a user YAML file (``--config``); keys are flag names (``weight_decay`` or ``weight-decay``)."""
    return _read_yaml(path, "--config")


# Options of a resumed run that describe that one invocation, not the training: not taken from the checkpoint.
_NOT_RESUMED = ("resume", "output", "experiment", "overwrite", "stop_after_epochs", "config", "save_rank_params")


def resumed_options(path: os.PathLike) -> Dict[str, Any]:
    """The options stored in an ``elsa train`` checkpoint (so ``--resume FILE`` alone continues the same run)."""
    from ..checkpoint import load_training_checkpoint

    args = load_training_checkpoint(path).get("args") or {}
    return {k: v for k, v in args.items() if k in FIELDS and k not in _NOT_RESUMED}


def build_config(cli: Dict[str, Any]) -> TrainConfig:
    """Merge defaults < options of the --resume checkpoint < recipe < config file < command line options (only
    those given) into a ``TrainConfig``.

    With no data, no recipe and no --resume, the ``digits`` recipe applies (``elsa train`` alone trains on the
    digits).
    """
    cli = {k: v for k, v in cli.items() if k in FIELDS}
    recipe = cli.get("recipe")
    config_path = cli.get("config")
    file_values = load_config_file(config_path) if config_path else {}
    recipe = recipe or file_values.get("recipe")
    resume = cli.get("resume", file_values.get("resume"))
    values: Dict[str, Any] = resumed_options(resume) if resume else {}
    data = cli.get("data", file_values.get("data", values.get("data")))
    if recipe is None and data in (None, "digits") and not resume:
        recipe = "digits"
    if recipe:
        values.update(load_recipe(recipe))
    values.update(file_values)
    values.update(cli)
    if recipe:
        values["recipe"] = recipe
    return TrainConfig(**_coerced(values))


_NUMBER_TYPES = {"float": float, "Optional[float]": float, "int": int, "Optional[int]": int}


def _coerced(values: Dict[str, Any]) -> Dict[str, Any]:
    """Numbers written as text become numbers: PyYAML reads ``lr: 1e-3`` as the string '1e-3' (YAML 1.1 wants a
    dot in the mantissa), which the flag ``--lr 1e-3`` reads as a float. Text that is not a number is an error
    naming the option."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out = dict(values)
    for name, value in values.items():
        kind = _NUMBER_TYPES.get(str(types.get(name)))
        if kind is None or not isinstance(value, str):
            continue
        try:
            out[name] = kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')} must be a number, got {value!r}") from None
    return out


_TYPE_CHECKS = {
    "int": (int,), "Optional[int]": (int, type(None)), "float": (int, float),
    "Optional[float]": (int, float, type(None)),
    "bool": (bool,), "str": (str,), "Optional[str]": (str, type(None)),
}


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}


def _check_types(cfg: TrainConfig) -> None:
    """Each option has its field's type (a --config file or recipe can hold anything YAML can): an epoch count of
    1.5, a flag of "yes" or a list where a number belongs is an error naming the option."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"--{f.name.replace('_', '-')}"
        kinds = _TYPE_CHECKS.get(str(f.type))
        if kinds is not None:
            wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            if wrong:
                raise ValueError(f"{name} must be {_TYPE_NAMES[str(f.type).replace('Optional[', '').rstrip(']')]}, "
                                 f"got {value!r}")
        elif str(f.type) in ("List[float]", "Optional[List[float]]") and value is not None:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in value):
                raise ValueError(f"{name} must be a list of numbers, got {value!r}")


def validate_config(cfg: TrainConfig) -> None:
    """Argument checks with the option's name, what came and what was expected (before anything is built)."""
    _check_types(cfg)
    def positive(name: str, allow_none: bool = False) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if v is None or v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v!r}")

    for name in ("batch_size", "epochs", "lr"):
        positive(name)
    for name in ("validation_batch_size", "train_subset", "val_subset", "max_steps_per_epoch", "num_classes",
                 "img_size", "lr_base_size", "threads", "stop_after_epochs"):
        positive(name, allow_none=True)
    if cfg.data is None and cfg.recipe not in (None, "digits"):
        raise ValueError(f"--recipe {cfg.recipe} trains on a data folder: pass DATA (a folder with train/ and val/)")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs + cfg.cooldown_epochs + 1:
        raise ValueError(f"--warmup-epochs must be in [0, epochs), got {cfg.warmup_epochs} with epochs {cfg.epochs}")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"--amp-dtype must be 'float16' or 'bfloat16', got {cfg.amp_dtype!r}")
    for name in ("mixup", "cutmix", "reprob", "smoothing", "drop"):
        v = getattr(cfg, name)
        if v < 0:
            raise ValueError(f"--{name} must be >= 0, got {v}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise ValueError(f"--drop-path must be in [0, 1), got {cfg.drop_path}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {cfg.crop_pct}")
    if cfg.token_label_dir is not None:
        if cfg.no_aug:
            raise ValueError("--no-aug cannot be combined with --token-label-dir (the label maps follow the "
                             "random-resized crop)")
        if cfg.dense_weight < 0:
            raise ValueError(f"--dense-weight must be >= 0, got {cfg.dense_weight}")
    if cfg.token_label_size is not None and cfg.token_label_size <= 0:
        raise ValueError(f"--token-label-size must be > 0, got {cfg.token_label_size!r}")
    if cfg.model_ema and not 0 < cfg.model_ema_decay < 1:
        raise ValueError(f"--model-ema-decay must be in (0, 1), got {cfg.model_ema_decay}")
    for name in ("weight_decay", "warmup_lr", "min_lr", "color_jitter", "cooldown_epochs", "dense_weight"):
        v = getattr(cfg, name)
        if v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:  # a negative norm bound flips the gradient's sign
        raise ValueError(f"--clip-grad must be > 0 (or left out for no clipping), got {cfg.clip_grad}")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr must be <= --lr, got min-lr {cfg.min_lr} with lr {cfg.lr}")
    for name in ("smoothing", "drop"):
        if getattr(cfg, name) >= 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("hflip", "vflip", "mixup_prob", "mixup_switch_prob", "momentum"):
        v = getattr(cfg, name)
        if not 0 <= v <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if cfg.decay_rate <= 0:
        raise ValueError(f"--decay-rate must be > 0, got {cfg.decay_rate}")
    if cfg.decay_epochs <= 0:  # the step schedule divides by it
        raise ValueError(f"--decay-epochs must be > 0, got {cfg.decay_epochs}")
    if cfg.opt_eps is not None and cfg.opt_eps <= 0:
        raise ValueError(f"--opt-eps must be > 0, got {cfg.opt_eps}")
    if cfg.opt_betas is not None and (len(cfg.opt_betas) != 2 or not all(0 <= b < 1 for b in cfg.opt_betas)):
        raise ValueError(f"--opt-betas takes two numbers in [0, 1) (beta1 beta2), got {list(cfg.opt_betas)}")
    if cfg.cutmix_minmax is not None:
        v = list(cfg.cutmix_minmax)
        if len(v) != 2 or not 0 < v[0] < v[1] <= 1:
            raise ValueError(f"--cutmix-minmax takes two numbers 0 < min < max <= 1, got {v}")
    for name, bound in (("scale", 1.0), ("ratio", None)):  # random-resized crop: area fraction and aspect range
        v = list(getattr(cfg, name) or [])
        if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"--{name} takes two numbers (min max), got {v!r}")
        if not 0 < v[0] <= v[1] or (bound is not None and v[1] > bound):
            raise ValueError(f"--{name} must be 0 < min <= max{f' <= {bound:g}' if bound else ''}, got {v[0]:g} "
                             f"{v[1]:g}")
    if cfg.remode not in ("pixel", "rand", "const"):
        raise ValueError(f"--remode must be 'pixel', 'rand' or 'const' (timm's RandomErasing modes), got "
                         f"{cfg.remode!r}")
    if cfg.recount < 1:
        raise ValueError(f"--recount must be >= 1, got {cfg.recount}")
    if cfg.reprob > 1:
        raise ValueError(f"--reprob must be in [0, 1], got {cfg.reprob}")
