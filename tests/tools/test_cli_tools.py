"""End-to-end tests of `elsa validate`, `elsa predict`, `elsa visualize` and `elsa plot`, run in-process through
``elsa.cli.main.main`` on a tiny synthetic image folder and checkpoints the tests write themselves."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import elsa  # noqa: F401 - registers the ELSA models with timm
from elsa.cli.main import main
from elsa.io import save_safetensors, torch_save
from elsa.tools import attention_maps, read_metrics

MODEL = "elsa_swin_pico"
NUM_CLASSES = 3
COLORS = [(230, 40, 40), (40, 200, 60), (50, 70, 230)]


def _pico(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODEL, num_classes=NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """ROOT/val/classK/*.png: 3 classes x 4 images of a coloured square on a dark background, 32x32."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.RandomState(0)
    for c, color in enumerate(COLORS):
        folder = root / "val" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            img = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.randint(0, 60, 3)))
            y, x = rng.randint(0, 16, 2)
            ImageDraw.Draw(img).rectangle([x, y, x + 14, y + 14], fill=color)
            img.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Training-style .pth (weights A under module.-prefixed state_dict, EMA weights B), and A as .safetensors."""
    out = tmp_path_factory.mktemp("ckpt")
    a, b = _pico(1).state_dict(), _pico(2).state_dict()
    torch_save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in a.items()}, "state_dict_ema": b},
               out / "train.pth")
    save_safetensors(a, out / "model.safetensors")
    return {"pth": out / "train.pth", "safetensors": out / "model.safetensors", "A": a, "B": b}


def _load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent preprocessing: the pico cfg is 32x32, crop 1.0, mean = std = 0.5, so no resizing."""
    images, labels = [], []
    for c in range(NUM_CLASSES):
        for f in sorted((root / "val" / f"class{c}").glob("*.png")):
            arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def _expected(state_dict: dict, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        logits = model(images)
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    return top1, F.cross_entropy(logits, labels).item()


def _validate(data: Path, ckpt: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"results{len(list(tmp_path.glob('*.json')))}.json"
    rc = main(["validate", str(data), "--model", MODEL, "--checkpoint", str(ckpt), "-b", "5", "-j", "0",
               "--no-progress", "--results-file", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_validate_matches_independent_accuracy(data, checkpoints, tmp_path, capsys, caplog):
    images, labels = _load_folder(data)
    top1_a, loss_a = _expected(checkpoints["A"], images, labels)
    top1_b, loss_b = _expected(checkpoints["B"], images, labels)
    assert abs(loss_a - loss_b) > 1e-3  # the two weight sets are distinguishable through the loss

    # Official README flags (--apex-amp aside); nested `module.`-prefixed state_dict; num_classes from the file.
    res = _validate(data, checkpoints["pth"], tmp_path, "--no-test-pool", "--img-size", "32")
    assert res["num_images"] == 12 and res["topk"] == NUM_CLASSES
    assert res["top1"] == pytest.approx(top1_a) and res["loss"] == pytest.approx(loss_a, abs=1e-4)
    assert res["top5"] == pytest.approx(100.0)  # top-3 of 3 classes
    assert f"top-1 {top1_a:.3f}%" in capsys.readouterr().out

    ema = _validate(data, checkpoints["pth"], tmp_path, "--use-ema")
    assert ema["use_ema"] and ema["loss"] == pytest.approx(loss_b, abs=1e-4) and ema["top1"] == pytest.approx(top1_b)

    # --use-ema on a file without EMA weights: timm's rule, the regular weights, with a warning.
    caplog.clear()
    fallback = _validate(data, checkpoints["safetensors"], tmp_path, "--use-ema")
    assert fallback["loss"] == pytest.approx(loss_a, abs=1e-4) and "state_dict_ema" in caplog.text

    st = _validate(data, checkpoints["safetensors"], tmp_path, "--split", "val", "--num-samples", "7")
    assert st["num_images"] == 7
    top1_7, loss_7 = _expected(checkpoints["A"], images[:7], labels[:7])
    assert st["loss"] == pytest.approx(loss_7, abs=1e-4) and st["top1"] == pytest.approx(top1_7)


def test_validate_digits(tmp_path):
    from elsa.data import load_digits_split

    ckpt = tmp_path / "digits.safetensors"
    torch.manual_seed(0)
    model = timm.create_model(MODEL).eval()  # 10 classes
    save_safetensors(model.state_dict(), ckpt)
    res = _validate(Path("digits"), ckpt, tmp_path, "--num-samples", "16")
    imgs, labels = load_digits_split("val")
    x = (torch.from_numpy(imgs[:16]).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        logits = model(x[:, None].expand(-1, 3, -1, -1))
    labels = torch.from_numpy(labels[:16])
    assert res["data"] == "digits/val" and res["num_images"] == 16
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-4)
    assert res["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())


def test_validate_errors(data, checkpoints, tmp_path, capsys):
    rc = main(["validate", str(data), "--model", MODEL, "--checkpoint", str(tmp_path / "nope.pth"), "-j", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint" in err and "nope.pth" in err and "does not exist" in err

    no_ema = tmp_path / "plain.pth"
    torch_save(checkpoints["A"], no_ema)

    rc = main(["validate", str(data), "--model", MODEL, "--checkpoint", str(no_ema), "--num-classes", "5"])
    assert rc == 2 and "shape mismatch for head.weight" in capsys.readouterr().err

    two = tmp_path / "two.safetensors"  # a 2-class model cannot score 3 class folders
    save_safetensors(timm.create_model(MODEL, num_classes=2).state_dict(), two)
    rc = main(["validate", str(data), "--model", MODEL, "--checkpoint", str(two), "-j", "0", "--no-progress"])
    assert rc == 2 and "the data has label 2 but the model has 2 classes" in capsys.readouterr().err

    rc = main(["validate", str(data), "--model", MODEL, "--checkpoint", str(no_ema), "--device", "gpu0"])
    assert rc == 2 and "--device: 'gpu0' is not a device name" in capsys.readouterr().err

    rc = main(["validate", str(tmp_path / "missing"), "--model", MODEL, "--checkpoint", str(no_ema)])
    assert rc == 2 and "DATA" in capsys.readouterr().err


def test_predict_reports_a_bad_file_and_predicts_the_others(data, checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    files = [data / "val" / "class0" / "0.png", bad, data / "val" / "class2" / "1.png"]
    argv = ["predict", *map(str, files), "--model", MODEL, "--checkpoint", str(checkpoints["pth"]), "--topk", "2"]
    assert main(argv + ["--json"]) == 2  # not every image was predicted
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["image"] for r in out] == list(map(str, files))  # in the order given
    assert len(out[0]["topk"]) == 2 and len(out[2]["topk"]) == 2
    assert "cannot be read" in out[1]["error"] and "bad.jpg" in captured.err and "Traceback" not in captured.err


def test_predict_topk_and_json(data, checkpoints, tmp_path, capsys):
    files = [data / "val" / "class0" / "0.png", data / "val" / "class2" / "1.png"]
    argv = ["predict", *map(str, files), "--model", MODEL, "--checkpoint", str(checkpoints["pth"]), "--topk", "2"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    images, _ = _load_folder(data)
    model = _pico(1)
    with torch.no_grad():
        probs = model(images[[0, 9]]).softmax(-1)  # class0/0.png, class2/1.png in folder order
    assert [r["image"] for r in out] == list(map(str, files))
    for r, p in zip(out, probs):
        got = [c["prob"] for c in r["topk"]]
        assert len(got) == 2 and got == sorted(got, reverse=True) and [c["rank"] for c in r["topk"]] == [1, 2]
        want = p.topk(2)
        assert [c["index"] for c in r["topk"]] == want.indices.tolist()
        assert got == pytest.approx(want.values.tolist(), abs=1e-5)

    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\n")
    assert main(argv + ["--class-names", str(names)]) == 0
    text = capsys.readouterr().out
    assert str(files[0]) in text and "1. " in text and "2. " in text and "3. " not in text
    assert any(n in text for n in ("red (0)", "green (1)", "blue (2)"))

    trained = tmp_path / "trained.pth"  # `elsa train` checkpoints store their class names
    torch_save({"state_dict": checkpoints["A"], "classes": ["red", "green", "blue"], "epoch": 1}, trained)
    assert main(["predict", str(files[0]), "--model", MODEL, "--checkpoint", str(trained), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["topk"]
    assert len(top) == 3 and {c["name"] for c in top} == {"red", "green", "blue"}  # top-5 capped at 3 classes

    names.write_text("red\ngreen\n")
    assert main(argv + ["--class-names", str(names)]) == 2
    assert "2 names but the model has 3 classes" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "no.png"), "--model", MODEL, "--checkpoint", str(checkpoints["pth"])]) == 2
    assert "no.png" in capsys.readouterr().err


def test_visualize_png_and_maps(data, checkpoints, tmp_path, capsys):
    image = data / "val" / "class1" / "2.png"
    out = tmp_path / "att.png"
    rc = main(["visualize", str(image), "--model", MODEL, "--checkpoint", str(checkpoints["safetensors"]),
               "--pixels", "4,4", "20,28", "--block", "layers.1.blocks.1", "--out", str(out)])
    assert rc == 0 and "layers.1.blocks.1" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        full = img.size
    assert full[0] >= 800 and full[1] >= 800  # (1 + 4 heads) rows x (1 ghost + 2 x 2 pixels) columns of panels
    rc = main(["visualize", str(image), "--model", MODEL, "--checkpoint", str(checkpoints["safetensors"]),
               "--pixels", "4,4", "20,28", "--block", "layers.1.blocks.1", "--heads", "0,3", "--out", str(out)])
    with Image.open(out) as img:
        assert rc == 0 and img.width == full[0] and 300 < img.height < full[1] * 0.75  # 2 of the 4 head rows

    # The figure's numbers: softmax of ELSA.attention_logits on the block's normalised input, at each pixel.
    model = _pico(1)
    x, _ = _load_folder(data)
    x = x[6]  # class1/2.png
    maps = attention_maps(model, x, block="layers.0.blocks.0", pixels=[(4, 4), (31, 0)], mean=(0.5,) * 3,
                          std=(0.5,) * 3)
    block = model.layers[0].blocks[0]
    with torch.no_grad():
        inp = block.norm1(model.patch_embed(x[None]))  # (1, 16, 16, 32): patch 2 -> cell of 2 pixels
        logits = block.attn.attention_logits(inp.permute(0, 3, 1, 2))
    g, k = block.attn.num_heads, block.attn.kernel_size
    want = logits.reshape(g, k * k, 16, 16).softmax(1).reshape(g, k, k, 16, 16)
    assert maps.map_pixels == [(2, 2), (15, 0)]
    torch.testing.assert_close(maps.attention[0], want[..., 2, 2])
    torch.testing.assert_close(maps.attention[1], want[..., 15, 0])
    assert maps.ghost_mul is None  # ELSA-Swin: lam = 0
    d = block.attn.ghost_head.reshape(g, -1, k, k).mean(1)
    torch.testing.assert_close(maps.ghost_add, d)
    torch.testing.assert_close(maps.combined, maps.attention + d)
    np.testing.assert_allclose(maps.image, (x.permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1), atol=1e-6)


def test_visualize_errors(data, checkpoints, capsys):
    base = ["visualize", str(data / "val" / "class0" / "0.png"), "--model", MODEL,
            "--checkpoint", str(checkpoints["pth"])]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--pixels", "3"])
    assert exc.value.code == 2 and "'y,x'" in capsys.readouterr().err
    assert main(base + ["--pixels", "40,3"]) == 2
    assert "--pixels: (40,3) is outside the 32x32 model input" in capsys.readouterr().err
    assert main(base + ["--block", "layers.2.blocks.0"]) == 2  # a window-attention block, not ELSA
    assert "layers.0.blocks.0" in capsys.readouterr().err
    assert main(base + ["--heads", "0,2"]) == 2  # layers.0 blocks have heads 0 and 1
    assert "--heads: [2]" in capsys.readouterr().err


def test_plot_curves(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["plot", str(run)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    assert "empty" in capsys.readouterr().err

    rows = [dict(epoch=e, train_loss=2.3 / (e + 1), val_loss=2.4 / (e + 1), val_top1=10 + 15 * e,
                 val_top5=50 + 9 * e, lr=1e-3 * 0.5 ** e, images_per_s=100.0, skipped_images=0, epoch_time_s=3.0)
            for e in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 5, "tr')
    assert [r["epoch"] for r in read_metrics(run)] == list(range(5))  # the torn last line is skipped
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 800 and img.height >= 300
    assert main(["plot", str(run), "--out", str(tmp_path / "c.jpg")]) == 2



def test_class_names_sources(tmp_path):
    from elsa.tools import ToolError, class_names

    imagenet = class_names(1000)
    assert len(imagenet) == 1000 and imagenet[0].startswith("tench") and imagenet[999].startswith("toilet tissue")
    assert class_names(10) is None
    listed = tmp_path / "names.json"
    listed.write_text(json.dumps(["cat", "dog"]))
    assert class_names(2, listed) == ["cat", "dog"]
    with pytest.raises(ToolError, match="--class-names"):
        class_names(2, tmp_path / "absent.txt")


def test_attention_maps_with_both_ghosts():
    """lam = gamma = 1 (ELSA-VOLO's setting): the filter is mean_c(m_c * a + d_c) = mean(m) * a + mean(d)."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
            self.block = elsa.ELSABlock(16, num_heads=2, kernel_size=3, lam=1.0, gamma=1.0, group_width=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.stem(x).permute(0, 2, 3, 1))

    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(3, 24, 20)
    maps = attention_maps(model, x, pixels=[(23, 0), (9, 13)])
    assert maps.block == "block" and maps.map_size == (6, 5) and maps.map_pixels == [(5, 0), (2, 3)]
    torch.testing.assert_close(maps.attention.sum(dim=(-2, -1)), torch.ones(2, 2))
    m, d = model.block.attn.ghost_head  # (2, 1, C, K, K): [0] = m, [1] = d
    m, d = m.reshape(2, 8, 3, 3).mean(1), d.reshape(2, 8, 3, 3).mean(1)
    torch.testing.assert_close(maps.ghost_mul, m)
    torch.testing.assert_close(maps.ghost_add, d)
    torch.testing.assert_close(maps.combined, maps.attention * m + d)


def test_validate_apex_amp_flag_runs_autocast(data, checkpoints, tmp_path):
    """The official `--apex-amp` maps to native autocast (bfloat16 on CPU): same scores up to rounding."""
    images, labels = _load_folder(data)
    _, loss_a = _expected(checkpoints["A"], images, labels)
    res = _validate(data, checkpoints["pth"], tmp_path, "--apex-amp", "--num-samples", "6")
    _, loss_6 = _expected(checkpoints["A"], images[:6], labels[:6])
    assert res["amp"] is True and res["loss"] == pytest.approx(loss_6, abs=0.05)
