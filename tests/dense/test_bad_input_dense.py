"""Bad data and bad flags through the real ``elsa det`` / ``elsa seg`` commands (issue 14): each class of problem
ends in bounded time without a traceback, with exit code 2 and one line naming the cause, or (malformed COCO
records) trains with the bad records left out and counted per reason; an earlier run's files are never lost."""
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),  # the malicious file
              pytest.mark.usefixtures("one_thread")]

from elsa.cli.main import main  # noqa: E402
from synthetic_ade import NUM_CLASSES, make_synthetic_ade  # noqa: E402
from synthetic_coco import make_synthetic_coco, tiny_recipe_file  # noqa: E402

TINY_SEG = ('{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "group_width": 4, '
            '"elsa_kernel": 3, "window_size": 4, "patch_size": 4, "drop_path_rate": 0.0}')
SEG = ["--recipe", "upernet_elsa_swin_tiny_160k", "--backbone", "custom", "--backbone-kwargs", TINY_SEG,
       "--num-classes", str(NUM_CLASSES), "--head-channels", "16", "--aux-channels", "8", "--img-scale", "128,32",
       "--crop-size", "32", "--device", "cpu"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``elsa ARGV`` run in this process (an uncaught exception fails the test)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *names):
    """Exit code 2 and an ``elsa ...: error:`` line naming each of ``names``."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert lines, err
    for name in names:
        assert any(str(name) in line for line in lines), (name, err)


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=4, num_val=2, seed=0)
    return root


@pytest.fixture(scope="module")
def det_run(coco, tmp_path_factory):
    """A tiny detector trained for 1 iteration: (recipe file, output folder with last.pth)."""
    folder = tmp_path_factory.mktemp("det")
    recipe = tiny_recipe_file(folder)
    out = folder / "run"
    assert main(["det", "train", "--recipe", recipe, "--data", str(coco), "--output", str(out), "--iters", "1",
                 "--batch-size", "2", "--no-eval", "--no-progress"]) == 0
    return recipe, out


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    make_synthetic_ade(root, num_train=2, num_val=2, size=(32, 40), seed=0)
    return root


@pytest.fixture(scope="module")
def seg_ckpt(ade, tmp_path_factory):
    out = tmp_path_factory.mktemp("segrun")
    assert main(["seg", "train", *SEG, "--data", str(ade), "--output", str(out), "--iters", "1", "--batch-size", "2",
                 "--workers", "0", "--eval-interval", "0"]) == 0
    return out / "latest.pth"


def earlier_run(checkpoint: Path, run_dir: Path) -> bytes:
    """A run folder holding a copy of ``checkpoint`` under its own name, as an earlier run left it: its bytes."""
    run_dir.mkdir()
    data = checkpoint.read_bytes()
    (run_dir / checkpoint.name).write_bytes(data)
    return data


def bad_files(folder: Path, good: Path):
    """Checkpoint files no command may load: name -> path. ``evil`` would create folder/PWNED if unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.pth").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "random.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'PWNED'}",))

    (folder / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    return {p.stem: p for p in folder.glob("*.pth")} | {"missing": folder / "missing.pth"}


# ------------------------------------------------------------------------------------- malformed COCO records
def _write_bad_records(coco: Path, dst: Path) -> dict:
    """A copy of the synthetic train split with one record per malformed kind added; returns reason -> count."""
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    img = data["images"][0]
    good = data["annotations"][0]
    h, w = img["height"], img["width"]
    bad = [
        ("anns_bad_bbox", dict(good, bbox=good["bbox"][:3])),
        ("anns_bad_bbox", dict(good, bbox=None)),
        ("anns_bad_bbox", dict(good, bbox=["1", "2", "3", "4"])),
        ("anns_bad_bbox", {k: v for k, v in good.items() if k != "bbox"}),
        ("anns_bad_bbox", dict(good, bbox=[float("nan"), 1.0, 10.0, 10.0])),
        ("anns_bad_bbox", dict(good, bbox=[1.0, 1.0, float("inf"), 10.0])),
        ("anns_bad_segmentation", dict(good, segmentation={"size": [h, w], "counts": "zz!!"})),      # invalid RLE
        ("anns_bad_segmentation", dict(good, segmentation={"size": [h + 1, w], "counts": [(h + 1) * w]})),
        ("anns_bad_segmentation", dict(good, segmentation={"size": [h, w], "counts": [h * w - 1]})),
        ("anns_bad_segmentation", dict(good, segmentation="polygon")),
        ("anns_bad_segmentation", dict(good, segmentation=[[1, 2, 3, float("nan"), 5, 6]])),
        ("anns_bad_image_id", {k: v for k, v in good.items() if k != "image_id"}),
        ("anns_bad_category_id", dict(good, category_id=[1])),
        ("anns_bad_area", dict(good, area="big")),
        ("anns_bad_iscrowd", dict(good, iscrowd="yes")),
        ("anns_not_an_object", [1, 2, 3]),
        ("anns_ignore_flag", dict(good, ignore=1)),
    ]
    data["annotations"] += [rec for _, rec in bad]
    (dst / "annotations").mkdir(parents=True)
    (dst / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    (dst / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    (dst / "train2017").symlink_to(coco / "train2017")
    (dst / "val2017").symlink_to(coco / "train2017")
    counts: dict = {}
    for reason, _ in bad:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_malformed_records_are_left_out_counted_and_never_reach_the_loss(coco, det_run, tmp_path, capsys, caplog):
    recipe, _ = det_run
    root = tmp_path / "bad"
    expected = _write_bad_records(coco, root)
    out = tmp_path / "run"
    rc, printed, err = run(capsys, "det", "train", "--recipe", recipe, "--data", root, "--output", out,
                           "--iters", "2", "--batch-size", "4", "--no-progress")
    assert rc == 0, err
    # one log line per reason and split, with its count
    from elsa.dense.detection.annotations import REASONS
    for reason, n in expected.items():
        lines = [r.getMessage() for r in caplog.records if REASONS[reason] in r.getMessage()
                 and "instances_train2017.json" in r.getMessage()]
        assert len(lines) == 1 and f"left out {n} record(s)" in lines[0], (reason, lines)
    assert "anns_bad_bbox" in printed  # the end-of-training summary counts them too
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(v) for v in losses)
    assert json.loads((out / "metrics.json").read_text())["bbox"]["AP"] >= 0  # evaluation read the same file


def test_rle_check_agrees_with_pycocotools_encoder():
    """The compressed-RLE parser reads pycocotools' own strings back as the mask's runs (column-major, starting
    with a run of zeros), derived here from the mask directly."""
    from pycocotools import mask as mask_utils

    from elsa.dense.detection.annotations import check_segmentation, rle_run_lengths

    rng = np.random.default_rng(0)
    for h, w, p in ((7, 5, 0.5), (40, 33, 0.1), (64, 64, 0.97), (3, 200, 0.3)):
        m = (rng.random((h, w)) < p).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        flat = m.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        if flat[0] == 1:
            runs = [0] + runs
        assert rle_run_lengths(rle["counts"].decode("ascii")) == runs
        assert check_segmentation({"size": [h, w], "counts": rle["counts"].decode("ascii")}, h, w)[0]
        assert not check_segmentation({"size": [h, w + 1], "counts": rle["counts"].decode("ascii")}, h, w)[0]


@pytest.mark.parametrize("content", ["", '{"images": [', "[]", '{"images": [], "annotations": [], "categories": []}',
                                     '{"images": [], "annotations": []}'])
def test_bad_annotation_file_names_it(coco, det_run, tmp_path, capsys, content):
    recipe, _ = det_run
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.write_text(content)
    (tmp_path / "train2017").symlink_to(coco / "train2017")
    rc, _, err = run(capsys, "det", "train", "--recipe", recipe, "--data", tmp_path, "--output", tmp_path / "o",
                     "--iters", "1", "--no-eval", "--no-progress")
    assert_user_error(rc, err, ann)
    assert not (tmp_path / "o" / "last.pth").exists()


def test_no_usable_image_stops_at_once(coco, det_run, tmp_path):
    """Every image file missing: one line before training, in a subprocess with a time bound (it used to loop)."""
    recipe, _ = det_run
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_bytes(
        (coco / "annotations" / "instances_train2017.json").read_bytes())
    (tmp_path / "train2017").mkdir()
    proc = subprocess.run([sys.executable, "-m", "elsa", "det", "train", "--recipe", recipe, "--data", str(tmp_path),
                           "--output", str(tmp_path / "o"), "--iters", "5", "--no-eval", "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no usable image" in proc.stderr and "images_missing=4" in proc.stderr


# ------------------------------------------------------------------------------------------------- checkpoints
def test_bad_checkpoints_name_the_file(det_run, seg_ckpt, coco, ade, tmp_path, capsys):
    recipe, out = det_run
    files = bad_files(tmp_path / "bad", out / "last.pth")
    img = coco / "val2017" / "000000000001.png"
    for name, path in files.items():
        for argv in (["det", "predict", img, "--checkpoint", path, "--out", tmp_path / "p.png"],
                     ["det", "test", "--checkpoint", path, "--data", coco, "--no-progress"],
                     ["seg", "test", *SEG, "--checkpoint", path, "--data", ade],
                     ["det", "train", "--recipe", recipe, "--data", coco, "--output", tmp_path / "o", "--iters", "1",
                      "--no-eval", "--no-progress", "--pretrained", path],
                     ["seg", "train", *SEG, "--data", ade, "--output", tmp_path / "s", "--iters", "1",
                      "--workers", "0", "--pretrained", path]):
            rc, _, err = run(capsys, *argv)
            assert_user_error(rc, err, path)
            assert "--checkpoint" in err or "--pretrained" in err
    assert not (tmp_path / "bad" / "PWNED").exists()
    # another command's checkpoint: says which kind it is
    rc, _, err = run(capsys, "det", "predict", img, "--checkpoint", seg_ckpt, "--out", tmp_path / "p.png")
    assert_user_error(rc, err, seg_ckpt)
    assert "not a detection recipe" in err


def test_resume_from_another_model_says_which_and_keeps_the_file(det_run, coco, tmp_path, capsys):
    recipe, out = det_run
    run_dir = tmp_path / "run"
    before = earlier_run(out / "last.pth", run_dir)
    cascade = tiny_recipe_file(tmp_path, "cascade_mask_rcnn_tiny_test")
    rc, _, err = run(capsys, "det", "train", "--recipe", cascade, "--data", coco, "--output", run_dir, "--resume",
                     "--iters", "2", "--no-eval", "--no-progress")
    assert_user_error(rc, err, "mask_rcnn_tiny_test", "--resume")
    assert len(err.strip().splitlines()) == 1
    assert (run_dir / "last.pth").read_bytes() == before


def test_recipe_and_flag_values_are_checked(det_run, coco, tmp_path, capsys):
    rc, _, err = run(capsys, "det", "train", "--recipe", "nosuch", "--data", coco, "--output", tmp_path / "o")
    assert_user_error(rc, err, "nosuch", "mask_rcnn_elsa_swin_tiny_1x")
    for argv in (["det", "train", "--data", coco, "--lr", "-1"], ["det", "predict", "x.png", "--checkpoint", "c",
                                                                  "--out", "o.png", "--score-thr", "2"],
                 ["seg", "train", *SEG, "--data", "x", "--lr", "nan"], ["seg", "train", *SEG, "--data", "x",
                                                                       "--warmup-iters", "-3"]):
        with pytest.raises(SystemExit) as exc:  # argparse: usage + one error line naming the flag
            main([str(a) for a in argv])
        assert exc.value.code == 2
        assert argv[-2] in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- images and masks
def test_det_predict_reports_bad_images_and_draws_the_others(det_run, coco, tmp_path, capsys):
    _, out = det_run
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 4000, 3), dtype=np.uint8)).save(wide)
    good = coco / "val2017" / "000000000001.png"
    rc, printed, err = run(capsys, "det", "predict", good, tmp_path / "bad.jpg", tmp_path / "nope.png", wide,
                           "--checkpoint", out / "last.pth", "--out", tmp_path / "drawn", "--json",
                           tmp_path / "d.json", "--score-thr", "0")
    assert_user_error(rc, err, tmp_path / "bad.jpg", tmp_path / "nope.png")
    assert "Traceback" not in err
    for src in (good, wide):  # every readable image drawn, at its own size (a 4000x3 image too)
        with Image.open(tmp_path / "drawn" / f"{src.stem}.png") as im, Image.open(src) as ref:
            assert im.size == ref.size
    assert set(json.loads((tmp_path / "d.json").read_text())) == {str(good), str(wide)}


def test_det_test_with_an_unreadable_image_scores_the_rest_and_exits_2(det_run, coco, tmp_path, capsys):
    _, out = det_run
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    (root / "val2017" / "000000000002.png").write_bytes(b"truncated")
    rc, printed, err = run(capsys, "det", "test", "--checkpoint", out / "last.pth", "--data", root, "--out",
                           tmp_path / "m.json", "--no-progress")
    assert_user_error(rc, err, "1 of 2 images could not be read")
    assert json.loads((tmp_path / "m.json").read_text())["bbox"]["AP"] >= 0 and "| bbox |" in printed


def test_det_drawing_colours_classes_and_keeps_labels_inside():
    from elsa.dense.detection.draw import class_colour, draw_detections

    image = torch.full((3, 40, 60), 128, dtype=torch.uint8)
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0], [45.0, 25.0, 60.0, 40.0]])
    out = draw_detections(image, boxes, torch.tensor([1, 2]), ["box 0.99", "disc 0.98"])
    assert out.shape == (40, 60, 3)
    assert class_colour(1) != class_colour(2)
    for colour in (class_colour(1), class_colour(2)):
        assert (out == np.array(colour, dtype=np.uint8)).all(-1).sum() > 20  # outline and tag in the class colour
    # the tag of the box at the bottom-right corner is drawn inside the picture: its colour reaches the left of x=45
    assert (out[:, :45] == np.array(class_colour(2), dtype=np.uint8)).all(-1).any()


def test_ap_table_prints_na_for_no_objects(capsys):
    from elsa.cli.det import _print_metrics

    stats = {k: 0.5 for k in ("AP", "AP50", "AP75", "APs", "APm")}
    _print_metrics({"bbox": dict(stats, APl=-1.0, table="")})
    printed = capsys.readouterr().out
    assert "| bbox | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | n/a |" in printed and "-100" not in printed


def _ade_copy(ade: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(ade, dst)
    for p in sorted((dst / "ADEChallengeData2016" / "annotations").rglob("*.png")):
        arr = np.asarray(Image.open(p)).copy()
        Image.fromarray(edit(arr)).save(p)
    return dst


def _out_of_range(a):
    a[:2, :2] = 199
    return a


@pytest.mark.parametrize("kind,edit,cause", [
    ("range", _out_of_range, "[199]"),                                   # label 199 with 4 classes
    ("size", lambda a: a[:-3], "is ("),                                  # mask 3 rows shorter than the image
    ("ignored", lambda a: np.zeros_like(a), "not computable"),           # every label 0 = ignored
])
def test_seg_bad_masks(ade, seg_ckpt, tmp_path, capsys, kind, edit, cause):
    root = _ade_copy(ade, tmp_path / kind, edit)
    rc, _, err = run(capsys, "seg", "test", *SEG, "--checkpoint", seg_ckpt, "--data", root,
                     "--json", tmp_path / "r.json")
    assert_user_error(rc, err, cause)
    if kind != "ignored":  # the file is named
        assert "ADE_valid_00000000.png" in err
    if kind == "range":  # training stops too, naming the file, instead of an IndexError in the loss
        rc, _, err = run(capsys, "seg", "train", *SEG, "--data", root, "--output", tmp_path / "o", "--iters", "1",
                         "--batch-size", "1", "--workers", "0")
        assert_user_error(rc, err, "ADE_train_0000000", "[199]")


def test_seg_extreme_aspect_predict_and_eval(ade, seg_ckpt, tmp_path, capsys):
    import shutil

    root = tmp_path / "wide"
    shutil.copytree(ade, root)
    ade_dir = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (3, 400, 3), dtype=np.uint8)).save(
        ade_dir / "images" / "validation" / "ADE_valid_00000009.jpg")
    Image.fromarray(rng.integers(1, NUM_CLASSES + 1, (3, 400), dtype=np.uint8)).save(
        ade_dir / "annotations" / "validation" / "ADE_valid_00000009.png")
    rc, printed, err = run(capsys, "seg", "test", *SEG, "--checkpoint", seg_ckpt, "--data", root, "--json",
                           tmp_path / "r.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 3
    tall = tmp_path / "tall.png"
    Image.fromarray(rng.integers(0, 255, (4000, 3, 3), dtype=np.uint8)).save(tall)
    rc, printed, err = run(capsys, "seg", "predict", tall, *SEG, "--checkpoint", seg_ckpt, "--out", tmp_path / "t.png")
    assert rc == 0, err


# ------------------------------------------------------------------------------------------------------- help
def _actions(argv):
    from elsa.cli.main import build_parser

    parser = build_parser()
    for name in argv:
        parser = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
                      ).choices[name]
    return parser


@pytest.mark.parametrize("argv", [("seg", "train"), ("seg", "test"), ("seg", "predict"), ("det", "train"),
                                  ("det", "test"), ("det", "predict")])
def test_every_dense_flag_is_documented(argv):
    import argparse

    parser = _actions(argv)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help != argparse.SUPPRESS, (argv, action.option_strings)
    text = parser.format_help()
    assert "--threads" in text
    if argv == ("seg", "train"):
        for flag in ("--iters", "--batch-size", "--lr", "--crop-size", "--img-scale", "--num-classes"):
            assert flag in text


def test_seg_recipes_lists_the_official_settings(capsys):
    from elsa.dense.segmentation.recipes import RECIPES

    rc, printed, _ = run(capsys, "seg", "recipes")
    assert rc == 0
    for name, r in RECIPES.items():
        row = next(line for line in printed.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {r.iters} |" in row and f"{r.crop_size[0]}x{r.crop_size[1]}" in row and f"{r.lr:g}" in row


# ------------------------------------------------------------------------------------------ earlier runs are kept
def test_a_second_det_train_never_overwrites_the_first(det_run, coco, tmp_path, capsys):
    recipe, first = det_run
    out = tmp_path / "run"
    before = earlier_run(first / "last.pth", out)
    argv = ["det", "train", "--recipe", recipe, "--data", coco, "--output", out, "--iters", "1", "--batch-size", "2",
            "--no-eval", "--no-progress"]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    assert (out / "last.pth").read_bytes() == before  # the earlier run is untouched ...
    assert (tmp_path / "run-1" / "last.pth").is_file()  # ... and the new one went next to it
    rc, _, err = run(capsys, *argv, "--overwrite")  # asked for: replaced in place
    assert rc == 0, err
    assert (out / "last.pth").read_bytes() != before
    assert not (tmp_path / "run-2").exists()


def test_a_second_seg_train_never_overwrites_the_first(seg_ckpt, ade, tmp_path, capsys):
    out = tmp_path / "seg"
    before = earlier_run(seg_ckpt, out)
    rc, _, err = run(capsys, "seg", "train", *SEG, "--data", ade, "--output", out, "--iters", "1", "--batch-size",
                     "2", "--workers", "0", "--eval-interval", "0")
    assert rc == 0, err
    assert (out / "latest.pth").read_bytes() == before
    assert (tmp_path / "seg-1" / "latest.pth").is_file()
