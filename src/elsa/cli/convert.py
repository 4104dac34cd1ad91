"""``elsa convert OFFICIAL.pth OUT.safetensors --model NAME``: convert an official checkpoint and verify the result."""
from __future__ import annotations

import argparse
import logging

import timm
import torch

from ._common import add_threads_option, command

_logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official .pth checkpoint to .safetensors and verify it",
                       description="Load an official (or timm-style training) checkpoint into MODEL, write its "
                                   "weights to a .safetensors file atomically, then reload the file and check that "
                                   "every tensor and the model's output on a random input are identical.")
    p.add_argument("checkpoint", help="official .pth file (weights at top level or under state_dict/model/state_dict_ema)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--model", required=True, help="registered model name, e.g. elsa_swin_tiny")
    p.add_argument("--use-ema", action="store_true", help="take the EMA weights (state_dict_ema)")
    add_threads_option(p)
    p.set_defaults(func=command("convert")(run))


def convert(checkpoint: str, output: str, model_name: str, use_ema: bool = False) -> dict:
    """Convert and verify; returns a summary (tensors, classes, max output difference)."""
    import elsa  # noqa: F401
    from ..io import save_safetensors
    from ..checkpoint import CheckpointError, read_checkpoint
    from ..models import load_checkpoint, unwrap_state_dict

    if not output.endswith(".safetensors"):
        raise ValueError(f"OUTPUT must end with .safetensors, got {output!r}")
    if not timm.models.is_model(model_name):
        raise ValueError(f"--model {model_name!r} is not a registered model (see `elsa models`)")
    raw = read_checkpoint(checkpoint, "CHECKPOINT file")  # one clear line for a missing/empty/truncated/foreign file
    try:
        state = unwrap_state_dict(raw, use_ema=use_ema)
    except CheckpointError as err:
        raise CheckpointError(f"CHECKPOINT file {checkpoint!r}: {err}") from err
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = timm.create_model(model_name, num_classes=num_classes).eval()
    try:
        load_checkpoint(model, raw, use_ema=use_ema)
    except CheckpointError as err:
        raise CheckpointError(f"CHECKPOINT file {checkpoint!r} does not fit --model {model_name}: {err}") from err
    metadata = {"model": model_name, "arch": model_name, "source": str(checkpoint), "num_classes": str(num_classes)}
    if isinstance(raw, dict):  # an `elsa train` checkpoint: keep what the tools read (class names, data config)
        import json

        for key in ("classes", "data_config"):
            if raw.get(key):
                metadata[key] = json.dumps(raw[key])
    save_safetensors(model.state_dict(), output, metadata=metadata)

    check = timm.create_model(model_name, num_classes=num_classes).eval()
    load_checkpoint(check, output)
    mismatched = [k for k, v in model.state_dict().items() if not torch.equal(v, check.state_dict()[k])]
    if mismatched:
        raise RuntimeError(f"verification failed: {len(mismatched)} tensors differ after reload, e.g. {mismatched[:3]}")
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    with torch.no_grad():
        diff = (model(x) - check(x)).abs().max().item()
    if diff != 0:
        raise RuntimeError(f"verification failed: outputs differ by {diff} after reload")
    return dict(tensors=len(model.state_dict()), num_classes=num_classes, max_output_diff=diff)


def run(args: argparse.Namespace) -> int:
    summary = convert(args.checkpoint, args.output, args.model, args.use_ema)
    print(f"wrote {args.output}: {summary['tensors']} tensors, {summary['num_classes']} classes; "
          f"reloaded and verified (identical tensors, max output difference {summary['max_output_diff']})")
    return 0
