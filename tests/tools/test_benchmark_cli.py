"""`elsa benchmark` and elsa.benchmarking: a real (tiny) measurement on CPU, and clear errors."""
import argparse
import json

import pytest

from elsa import benchmarking as bench
from elsa.cli import benchmark as cli


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["benchmark", *argv])


def test_cli_measures_inference_and_training_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = _parse(["--models", "elsa_swin_pico", "--device", "cpu", "--batch", "2", "--warmup", "0",
                   "--iters", "1", "--no-progress", "--out", str(out)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| elsa_swin_pico | infer | fp32 | 2 | 32x32 |" in table
    doc = json.loads(out.read_text())
    assert doc["environment"]["device"] == "cpu" and doc["environment"]["torch"]
    results = {r["mode"]: r for r in doc["results"]}
    assert set(results) == {"infer", "train"}
    for r in results.values():
        assert r["model"] == "elsa_swin_pico" and r["images_per_s"] > 0 and r["peak_mem_mb"] is None
        assert r["settings"]["batch"] == 2 and r["input_size"] == [3, 32, 32]


def test_training_step_updates_the_weights():
    import torch

    settings = bench.BenchSettings(device="cpu", batch=2, warmup=0, iters=1)
    model = bench.create_model("elsa_swin_pico", settings)
    before = model.head.weight.detach().clone()
    result = bench.measure("elsa_swin_pico", "train", settings, model)
    assert result.images_per_s > 0
    assert not torch.equal(before, model.head.weight)


def test_baselines_are_added_and_compared():
    assert bench.expand_models(["elsa_volo_d1_224", "elsa_swin_tiny", "volo_d1_224"]) == [
        "elsa_volo_d1_224", "volo_d1_224", "elsa_swin_tiny", "swin_tiny_patch4_window7_224"]
    s = vars(bench.BenchSettings())
    mk = lambda name, ips: bench.BenchResult(name, "infer", s, [3, 224, 224], 1.0, ips, 1.0, None,
                                             bench.PAIRS.get(name))
    table = bench.format_table([mk("elsa_swin_tiny", 50.0), mk("swin_tiny_patch4_window7_224", 100.0)])
    assert "0.50x swin_tiny_patch4_window7_224" in table


def test_bad_arguments_give_clear_errors(capsys):
    args = _parse(["--models", "no_such_model", "--device", "cpu", "--no-progress"])
    assert args.func(args) == 2
    assert "no_such_model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch"):
        bench.BenchSettings(batch=0)
    with pytest.raises(ValueError, match="precision"):
        bench.BenchSettings(precision="fp8")
