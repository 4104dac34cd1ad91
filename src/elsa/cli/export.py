"""``elsa export MODEL --format onnx|pt2 [--checkpoint FILE]``: write a deployable file and check it."""
from __future__ import annotations

import argparse

from ._common import add_threads_option, command, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or a torch.export program (.pt2), checked",
                       description="Export MODEL (with the weights of --checkpoint) with a dynamic batch axis, then "
                                   "load the written file, run it at another batch size and report its largest "
                                   "difference from eager PyTorch. ONNX files use standard ops only (no ELSA custom "
                                   "op); .pt2 programs keep the fast custom ops (load them after `import elsa`).")
    p.add_argument("model", help="registered model name, e.g. elsa_swin_tiny")
    p.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    p.add_argument("--checkpoint", default=None, help=".pth or .safetensors weights (default: random initialisation)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else the model's")
    p.add_argument("--output", default=None, help="default: MODEL.onnx / MODEL.pt2")
    p.add_argument("--img-size", type=positive_int, default=None, help="default: the model's input size")
    p.add_argument("--batch", type=positive_int, default=2, help="example batch traced (the axis stays dynamic)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="height and width dynamic too (checked at --check-size)")
    p.add_argument("--check-size", type=positive_int, default=None,
                   help="size the written file is checked at (default: --img-size; another needs --dynamic-size)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="ONNX exporter: torch.export-based (default) or the older TorchScript-based one")
    add_threads_option(p)
    p.set_defaults(func=command("export")(run))


def run(args: argparse.Namespace) -> int:
    from ..tools import create_model_from_checkpoint
    from ..tools.export import export_model

    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=args.num_classes)
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    in_chans = model.pretrained_cfg.get("input_size", (3,))[0]
    output = args.output or f"{args.model}.{args.format}"
    report = export_model(model, output, args.format, size, in_chans, args.batch, args.exporter,
                          dynamic_size=args.dynamic_size, check_size=args.check_size)
    print(f"wrote {report.path} ({report.format}, {report.exporter}, {report.seconds:.1f} s); checked at batch "
          f"{args.batch + 1}, size {args.check_size or size}: max |difference| from eager {report.max_abs_diff:.2e}")
    return 0
