"""Helpers for the training tests: tiny synthetic image folders, running ``elsa train`` in-process or as a
subprocess with one thread per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

# One thread per process and passive OpenMP waiting: on a loaded 2-core machine, spinning OpenMP threads made a
# training step ~10x slower in our measurements.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"}


def make_image_folder(root: Path, classes: Sequence[str] = ("cat", "dog"), per_class: int = 8, size: int = 16,
                      splits: Sequence[str] = ("train", "val"), seed: int = 0) -> Path:
    """DATA/{train,val}/CLASS/*.png with class-dependent mean colour (learnable)."""
    rng = np.random.RandomState(seed)
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = 40 + 170 * ci / max(len(classes) - 1, 1)
                arr = np.clip(rng.normal(base, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i:03d}.png")
    return root


def train_parser():
    """A parser with only the ``train`` subcommand (in-process tests need no other subcommand importable)."""
    import argparse

    from elsa.cli import train as train_cli

    parser = argparse.ArgumentParser(prog="elsa")
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def run_train(args: Sequence[str]) -> int:
    """``elsa train ARGS`` in this process; returns the exit code."""
    ns = train_parser().parse_args(["train", *args])
    return ns.func(ns)


def elsa_subprocess(args: Sequence[str], launcher: Optional[List[str]] = None, **kwargs) -> subprocess.Popen:
    """Start ``python -m elsa ARGS`` (or ``python LAUNCHER... -m elsa ARGS``) with one thread per process."""
    env = dict(os.environ, **SUBPROCESS_ENV)
    cmd = [sys.executable] + (launcher or []) + ENTRY + list(args)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def read_jsonl(path: Path) -> List[Dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# How subprocess tests start the command: the real console entry, as users and torchrun run it.
ENTRY = ["-m", "elsa"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
