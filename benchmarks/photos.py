"""Photo-like JPEGs for the serving benchmarks.

Smooth shading, hard-edged blocks and sensor-like noise: a JPEG of this content keeps
most of its DCT coefficients, so it decodes about as slowly as a camera photo of the same
size (flat synthetic drawings decode several times faster and would flatter the service).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# The sizes the benchmarks send: a web-sized photo, and a phone photo of 2 megapixels.
WEB = (480, 360)
PHONE_2MP = (1632, 1224)


def photo_like(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A JPEG with smooth shapes, edges and fine texture (decodes like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack(
        [
            128 + 80 * np.sin(x / (17 + 5 * c) + y / (23 + 3 * c) + phase[c]) * np.cos(y / (31 + c))
            for c in range(3)
        ],
        axis=-1,
    )
    blocks = ((x // 97 + y // 61) % 3)[..., None] * 25.0
    texture = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(base + blocks + texture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_photos(size: tuple[int, int], count: int, out: Path, prefix: str) -> list[Path]:
    """``count`` different photo-like JPEGs of ``size`` (width, height) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"{prefix}{i}.jpg"
        path.write_bytes(photo_like(*size, seed=i))
        paths.append(path)
    return paths
