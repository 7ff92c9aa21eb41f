import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from wastenet.preprocess import eval_transform, normalize, resize_crop, to_rgb
from wastenet.schema import Preprocessing


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 128))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((3, 3)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 255] + [0, 255, 0] + [0, 0, 0] * 254)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    rgb = to_rgb(img)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 255, 0)


def test_grayscale_with_alpha_and_plain_grayscale() -> None:
    assert to_rgb(Image.new("LA", (1, 1), (10, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    rgb = to_rgb(img)
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_cmyk_becomes_rgb() -> None:
    rgb = to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))
    assert rgb.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = to_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200  # the white half is now on top
    assert upright.getpixel((10, 35))[0] < 50


def test_resize_crop_and_normalize() -> None:
    p = Preprocessing(resize_size=40, input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    img = Image.new("RGB", (80, 60), (255, 0, 128))
    t = resize_crop(img, p)
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32)
    n = normalize(t.unsqueeze(0), p)
    assert n.shape == (1, 3, 32, 32)
    assert n[0, 0].unique().tolist() == [1.0]
    assert n[0, 1].unique().tolist() == [-2.0]
    assert torch.allclose(n[0, 2], torch.full((32, 32), 128 / 255 - 0.5))
    full = eval_transform(p)(img.convert("P"))
    assert full.shape == (3, 32, 32) and full.dtype == torch.float32


def test_eval_transform_pickles_for_spawned_workers() -> None:
    p = Preprocessing(resize_size=40, input_size=32)
    img = Image.new("RGB", (50, 45), (10, 200, 30))
    clone = pickle.loads(pickle.dumps(eval_transform(p)))
    assert torch.equal(clone(img), eval_transform(p)(img))
