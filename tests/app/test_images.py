"""Decoding uploads: formats, colour modes, orientation, limits, and parity with training."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.backends import TorchBackend
from app.images import ImageRejected, decode_image
from tests.app.conftest import torch_model
from wastenet.preprocess import eval_transform, normalize
from wastenet.schema import Preprocessing

P = Preprocessing(resize_size=36, input_size=32)
LIMIT = 10_000_000


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def centre_pixel(data: bytes) -> tuple[int, ...]:
    tensor = decode_image(data, "x", P, LIMIT).tensor
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 32, 32)
    return tuple(int(v) for v in tensor[:, 16, 16])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_allowed_format_decodes(fmt: str) -> None:
    img = Image.new("RGB", (40, 30), (20, 120, 220))
    save: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(img, fmt, **save), f"a.{fmt.lower()}", P, LIMIT)
    assert decoded.width == 40 and decoded.height == 30
    r, g, b = (int(v) for v in decoded.tensor[:, 16, 16])
    assert abs(r - 20) <= 8 and abs(g - 120) <= 8 and abs(b - 220) <= 8


def test_service_tensor_equals_training_eval_transform() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels, "RGB"), "PNG")
    served = normalize(decode_image(data, "a.png", P, LIMIT).tensor.unsqueeze(0), P)[0]
    trained = eval_transform(P)(Image.open(io.BytesIO(data)))
    assert torch.equal(served, trained)


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert centre_pixel(encode(transparent, "PNG")) == (255, 255, 255)
    half = Image.new("LA", (40, 40), (0, 128))
    value = centre_pixel(encode(half, "PNG"))
    assert all(abs(v - 127) <= 1 for v in value)


def test_palette_with_transparency_grayscale_16bit_and_cmyk() -> None:
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert centre_pixel(encode(palette, "PNG")) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert centre_pixel(encode(palette, "PNG", transparency=1)) == (255, 255, 255)
    assert centre_pixel(encode(Image.new("L", (40, 40), 77), "PNG")) == (77, 77, 77)
    sixteen = Image.new("I;16", (40, 40), 65535)
    assert centre_pixel(encode(sixteen, "PNG")) == (255, 255, 255)
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = centre_pixel(encode(cmyk, "JPEG", quality=95))
    assert r > 230 and g < 30 and b < 30


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 30))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95), "r.jpg", P, LIMIT)
    assert (decoded.width, decoded.height) == (60, 30)  # header size, before rotation
    top = decoded.tensor[:, 2, 16]
    bottom = decoded.tensor[:, 29, 16]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ((250, 0, 0), (0, 250, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    r, g, _ = centre_pixel(buffer.getvalue())
    assert r > 200 and g < 50


def test_empty_file_is_refused() -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(b"", "empty.jpg", P, LIMIT)
    assert (info.value.status, info.value.code) == (422, "empty_file")
    assert "empty.jpg" in info.value.message and "0 bytes" in info.value.message


def test_truncated_jpeg_is_refused_not_half_decoded() -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageRejected) as info:
        decode_image(data[: len(data) // 2], "cut.jpg", P, LIMIT)
    assert (info.value.status, info.value.code) == (422, "undecodable_image")
    assert "cut.jpg" in info.value.message and "truncated" in info.value.message


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"hello, this is a text file\n", "text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "PDF"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        (bytes(range(256)) * 4, "not a recognised image"),
    ],
)
def test_non_images_are_refused_with_what_they_are(data: bytes, what: str) -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "upload.bin", P, LIMIT)
    assert (info.value.status, info.value.code) == (415, "unsupported_image_type")
    assert what in info.value.message and "upload.bin" in info.value.message


def test_formats_outside_the_list_are_refused() -> None:
    data = encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "a.ppm", P, LIMIT)
    assert info.value.status == 415


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels: tiny file, huge image."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    data = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header() -> None:
    data = bomb_png(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "bomb.png", P, LIMIT)
    assert (info.value.status, info.value.code) == (413, "image_too_large")
    assert "bomb.png" in info.value.message


def test_pixel_limit_is_ours() -> None:
    data = encode(Image.new("L", (300, 200)), "PNG")
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "wide.png", P, max_pixels=50_000)
    assert info.value.status == 413
    assert "300x200" in info.value.message and "WASTE_MAX_IMAGE_PIXELS" in info.value.message
    assert decode_image(data, "wide.png", P, max_pixels=60_000).width == 300


def test_batched_inputs_equal_stacked_eval_transform(template_repo: Path) -> None:
    model = torch_model(template_repo / "waste-resnet18-cbam" / "1", max_batch_size=4)
    assert isinstance(model.backend, TorchBackend)
    rng = np.random.default_rng(2)
    blobs = [
        encode(Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)), "PNG")
        for i in range(3)
    ]
    decoded = [decode_image(b, "x.png", model.preprocessing, LIMIT).array for b in blobs]
    batch = model.backend.normalise(model.stack(decoded))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    expected = torch.stack(
        [eval_transform(model.preprocessing)(Image.open(io.BytesIO(b))) for b in blobs]
    )
    # uint8 * scale + bias instead of (uint8 / 255 - mean) / std: float rounding only.
    assert torch.allclose(batch, expected, rtol=0, atol=1e-6)


# -- large JPEGs at reduced scale ----------------------------------------------------------
FULL = Preprocessing()  # 256 -> 224, what served versions use


def detailed(width: int, height: int, seed: int) -> Image.Image:
    """Worst case for a reduced decode: a chirp, fine stripes, a 40 px checkerboard, noise,
    and a dark block in the top-left quarter only (so rotations and flips show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin(x * x / (width * 7.0))
    green = 128 + 100 * np.sign(np.sin(y / 9.0)) * (x / width)
    blue = np.where((x // 40 + y // 40) % 2 == 0, 230.0, 20.0)
    blue[: height // 3, : width // 2] = 0
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth shapes, soft edges and sensor-like noise, as in a phone photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 80 * np.sin(x / (17 + 5 * c) + y / (23 + 3 * c) + c) * np.cos(y / 31)
            for c in range(3)
        ],
        axis=-1,
    )
    blocks = ((x // 97 + y // 61) % 3)[..., None] * 25.0
    pixels = base + blocks + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def reduced_vs_full(data: bytes) -> np.ndarray:
    reduced = decode_image(data, "big.jpg", FULL, LIMIT).array.astype(np.int16)
    full = decode_image(data, "big.jpg", FULL, LIMIT, jpeg_draft=False).array.astype(np.int16)
    assert reduced.shape == full.shape == (224, 224, 3)
    return np.abs(reduced - full)


@pytest.mark.parametrize(
    ("image", "mean_limit", "p99_limit"),
    [
        (photo_like(1632, 1224, 0), 1.5, 8),  # a 2 MP phone-size photo
        (detailed(1632, 1224, 1), 3.0, 24),  # synthetic worst case, 2 MP
        (detailed(800, 600, 2), 3.0, 24),  # just over twice the resize size
    ],
    ids=["photo-2MP", "detailed-2MP", "detailed-800x600"],
)
def test_reduced_decode_stays_within_the_stated_tolerance(
    image: Image.Image, mean_limit: float, p99_limit: int
) -> None:
    diff = reduced_vs_full(encode(image, "JPEG", quality=92))
    assert diff.max() > 0  # the reduced decode really ran
    assert diff.mean() <= mean_limit
    assert np.percentile(diff, 99) <= p99_limit


def test_reduced_decode_keeps_the_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encode(detailed(1632, 1224, 3), "JPEG", quality=92, exif=exif.tobytes())
    decoded = decode_image(data, "rotated.jpg", FULL, LIMIT)
    assert (decoded.width, decoded.height) == (1632, 1224)  # the upload's own size
    diff = reduced_vs_full(data)
    assert diff.mean() <= 3.0
    # The dark block of the top-left quarter is now in the top-right corner.
    blue = decoded.array[:, :, 2].astype(float)
    assert blue[:40, -40:].mean() < 60 < blue[:40, :40].mean()


def test_only_jpegs_twice_the_resize_size_are_reduced() -> None:
    from app.images import reduce_large_jpeg

    big = Image.open(io.BytesIO(encode(detailed(1632, 1224, 4), "JPEG")))
    reduce_large_jpeg(big, 256)
    assert big.size == (408, 306)  # 1/4: the smallest scale whose short side covers 256
    small = Image.open(io.BytesIO(encode(detailed(600, 500, 5), "JPEG")))
    reduce_large_jpeg(small, 256)
    assert small.size == (600, 500)
    png = Image.open(io.BytesIO(encode(detailed(1200, 1200, 6), "PNG")))
    reduce_large_jpeg(png, 256)
    assert png.size == (1200, 1200)
    data = encode(detailed(600, 500, 5), "JPEG")
    assert reduced_vs_full(data).max() == 0  # below the threshold: training's exact pixels
