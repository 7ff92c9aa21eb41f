import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference_images import (
    ORIENT,
    QUADRANT_COLOURS,
    composite_on_white,
    encode,
    noise,
    quadrants,
    ramp,
    ramp_after_resize_crop,
    reference_normalize,
    reference_resize_crop,
)
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
    img = Image.fromarray(noise(50, 45, seed=3), "RGB")
    clone = pickle.loads(pickle.dumps(eval_transform(p)))
    assert torch.equal(clone(img), eval_transform(p)(img))


# -- asymmetric images against an independent reference (tests/reference_images.py) -----
# Solid-colour images pass whatever the resize, crop, channel order or orientation; these
# would not. Each test names the mistakes it exists to catch.

SIZES = [(144, 72), (72, 144), (180, 120), (101, 57), (40, 40), (20, 30)]


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resize_crop_equals_pillow_short_side_resize_and_centre_crop(
    width: int, height: int, interpolation: str
) -> None:
    """Any wrong geometry or channel order: squash, no resize, long side, corner crop, BGR."""
    p = Preprocessing(resize_size=36, input_size=32, interpolation=interpolation)
    pixels = noise(width, height, seed=width * height)
    out = resize_crop(Image.fromarray(pixels, "RGB"), p)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    expected = reference_resize_crop(pixels, 36, 32, interpolation)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize(("width", "height"), [(144, 72), (72, 144), (180, 120)])
def test_resize_crop_keeps_the_middle_of_a_ramp_at_the_short_side_scale(
    width: int, height: int
) -> None:
    """Expected values from geometry alone (no resampling library): R follows x, G follows y."""
    p = Preprocessing(resize_size=36, input_size=32)
    out = resize_crop(Image.fromarray(ramp(width, height), "RGB"), p).double().numpy()
    expected = ramp_after_resize_crop(width, height, 36, 32)
    assert np.abs(out - expected).max() <= 1.0


def test_ramp_reference_by_hand_for_a_landscape_image() -> None:
    """144x72 -> 72x36 (scale 2), crop columns 20..51 and rows 2..33 of the resized image."""
    expected = ramp_after_resize_crop(144, 72, 36, 32)
    assert expected[0, 0, 0] == 50 + 40.5 and expected[0, 0, 31] == 50 + 40.5 + 62
    assert expected[1, 0, 0] == 20 + 4.5 and expected[1, 31, 0] == 20 + 4.5 + 62
    assert (expected[2] == 200).all()


def test_quadrants_stay_in_their_corners_and_colours() -> None:
    """Flips, transposed H/W, swapped channels or a corner crop move or recolour a quadrant."""
    p = Preprocessing(resize_size=36, input_size=32)
    out = resize_crop(Image.fromarray(quadrants(96, 64), "RGB"), p)
    corners = {
        "top_left": out[:, 2, 2],
        "top_right": out[:, 2, 29],
        "bottom_left": out[:, 29, 2],
        "bottom_right": out[:, 29, 29],
    }
    for where, pixel in corners.items():
        assert tuple(pixel.tolist()) == QUADRANT_COLOURS[where], where


def test_the_crop_is_centred_on_the_long_side() -> None:
    """A 4 px bar at the middle of a 200 px wide image stays in the middle of the crop."""
    pixels = np.zeros((50, 200, 3), dtype=np.uint8)
    pixels[:, 98:102] = (255, 128, 0)
    p = Preprocessing(resize_size=50, input_size=40, interpolation="nearest")
    out = resize_crop(Image.fromarray(pixels, "RGB"), p)
    lit = torch.nonzero(out[0, 20] > 0).flatten().tolist()
    assert lit == [18, 19, 20, 21]
    assert out[:, 20, 19].tolist() == [255, 128, 0]


MEAN_STD = [
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ((0.1, 0.5, 0.9), (0.2, 0.4, 0.8)),
]


@pytest.mark.parametrize(("mean", "std"), MEAN_STD)
def test_normalize_equals_numpy_per_channel(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    """Catches mean and std swapped, a missing /255, std not applied, channels mixed up."""
    p = Preprocessing(resize_size=8, input_size=8, mean=mean, std=std)
    hwc = np.stack([noise(8, 8, seed) for seed in range(3)])  # (N, H, W, 3)
    batch = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    out = normalize(batch, p)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 8, 8)
    expected = reference_normalize(hwc, mean, std)
    assert np.allclose(out.double().numpy(), expected, atol=1e-5)
    assert np.allclose(normalize(batch[0], p).double().numpy(), expected[0], atol=1e-5)


def test_normalize_takes_floats_as_already_scaled_and_keeps_channels_last() -> None:
    p = Preprocessing(resize_size=8, input_size=8, mean=(0.1, 0.5, 0.9), std=(0.2, 0.4, 0.8))
    hwc = noise(8, 6, seed=4)[None]
    uint8 = torch.from_numpy(hwc).permute(0, 3, 1, 2)  # a channels_last view
    assert uint8.is_contiguous(memory_format=torch.channels_last)
    from_uint8 = normalize(uint8, p)
    from_float = normalize(uint8.double() / 255.0, p)
    expected = reference_normalize(hwc, p.mean, p.std)
    assert np.allclose(from_float.numpy(), expected, atol=1e-12)
    assert np.allclose(from_uint8.double().numpy(), expected, atol=1e-5)
    assert from_uint8.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("orientation", sorted(ORIENT))
def test_every_exif_orientation_is_undone_exactly(orientation: int) -> None:
    stored = noise(30, 20, seed=orientation)
    img = Image.open(io.BytesIO(encode(stored, "PNG", orientation)))
    upright = np.asarray(to_rgb(img))
    assert np.array_equal(upright, ORIENT[orientation](stored))


def test_alpha_is_composited_on_white_in_proportion() -> None:
    """Alpha dropped or composited on black gives other values on every translucent pixel."""
    rgba = np.concatenate([noise(64, 4, seed=5), np.zeros((4, 64, 1), np.uint8)], axis=-1)
    rgba[..., 3] = np.arange(0, 256, 4, dtype=np.uint8)  # every column its own alpha
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert np.abs(out - composite_on_white(rgba)).max() <= 1
    assert (out[:, 0] == 255).all()  # fully transparent is white, whatever the colour


@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
def test_eval_transform_equals_the_reference_pipeline(orientation: int) -> None:
    """Upright, alpha on white, short side resized, centre crop, normalised, RGB order."""
    p = Preprocessing(resize_size=36, input_size=32, mean=(0.1, 0.5, 0.9), std=(0.2, 0.4, 0.8))
    rgb = noise(90, 50, seed=orientation)
    alpha = np.where(np.arange(90) % 7 == 0, 0, 255).astype(np.uint8)  # transparent columns
    rgba = np.concatenate([rgb, np.broadcast_to(alpha[None, :, None], (50, 90, 1))], axis=-1)
    img = Image.open(io.BytesIO(encode(rgba, "PNG", orientation)))
    out = eval_transform(p)(img)
    upright = ORIENT[orientation](composite_on_white(rgba))
    expected = reference_normalize(reference_resize_crop(upright, 36, 32), p.mean, p.std)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert np.allclose(out.double().numpy(), expected, atol=1e-5)
