"""16-bit grey images are scaled to 8 bits, not clipped to white, wherever an image file is read."""
import numpy as np
import pytest
from PIL import Image

from elsa.data import ImageFolderDataset
from elsa.data.image import open_rgb, to_rgb
from elsa.tools.common import load_image


def _gradient16(path):
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(path)  # a 16-bit grey PNG (mode I;16 or I when read back)
    return values


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = _gradient16(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode in ("I;16", "I")
    rgb = np.asarray(open_rgb(tmp_path / "g.png"))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    assert np.abs(rgb[..., 0].astype(np.int64) - expected).max() <= 1
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200  # a gradient, not all white


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_eight_bit_images_are_unchanged(mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)).convert(mode)
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB")))


def test_train_and_predict_read_sixteen_bit_images_the_same_way(tmp_path):
    (tmp_path / "a").mkdir()
    _gradient16(tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    _gradient16(tmp_path / "b" / "y.png")
    ds = ImageFolderDataset(str(tmp_path))
    img, _ = ds[0]
    assert np.array_equal(np.asarray(img), np.asarray(load_image(tmp_path / "a" / "x.png")))
    assert np.asarray(img).max() == 255 and np.asarray(img).min() == 0
