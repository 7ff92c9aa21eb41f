"""Asymmetric test images and an independent reference for the image -> tensor path.

Everything here is built from Pillow and numpy directly and never calls
``wastenet.preprocess``, so a wrong resize, crop, channel order, orientation or
normalisation there cannot leak into the expected values. The images are chosen so that
each of those mistakes changes the result: the three channels differ, nothing is
symmetric about either axis or the diagonal, and the canvases are not square.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

EXIF_ORIENTATION = 0x0112

# EXIF orientation -> how the stored (H, W, C) array must be turned to display upright.
ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored about the main diagonal
    6: lambda a: np.rot90(a, -1),  # turn 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored about the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # turn 90 degrees anticlockwise
}

PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def ramp(width: int, height: int) -> np.ndarray:
    """R = 50 + x, G = 20 + y, B = 200: linear, so a resample's output is known exactly."""
    assert width <= 205 and height <= 235
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([50 + x, 20 + y, np.full_like(x, 200)], axis=-1).astype(np.uint8)


def noise(width: int, height: int, seed: int) -> np.ndarray:
    """Random RGB pixels: no structure a wrong geometry could preserve by chance."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


QUADRANT_COLOURS = {
    "top_left": (230, 30, 30),
    "top_right": (30, 200, 40),
    "bottom_left": (40, 50, 220),
    "bottom_right": (240, 220, 20),
}


def quadrants(width: int, height: int) -> np.ndarray:
    """Four solid quadrants of distinct colours meeting at the centre."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    out[:h, :w] = QUADRANT_COLOURS["top_left"]
    out[:h, w:] = QUADRANT_COLOURS["top_right"]
    out[h:, :w] = QUADRANT_COLOURS["bottom_left"]
    out[h:, w:] = QUADRANT_COLOURS["bottom_right"]
    return out


def encode(array: np.ndarray, fmt: str, orientation: int = 1, **save: object) -> bytes:
    """Encode an (H, W, 3|4) uint8 array; ``orientation`` is written as the EXIF tag."""
    mode = "RGBA" if array.shape[-1] == 4 else "RGB"
    img = Image.fromarray(np.ascontiguousarray(array), mode)
    if orientation != 1:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        save["exif"] = exif
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight alpha over a white background, rounded to uint8."""
    rgb = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def short_side_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) with the short side at ``resize``; the long side is truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def centre_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left = round((width - size) / 2)
    top = round((height - size) / 2)
    return left, top, left + size, top + size


def reference_resize_crop(
    rgb: np.ndarray, resize: int, size: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """Short side to ``resize`` with Pillow, then the centred ``size`` square: uint8 (H, W, 3)."""
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    new = short_side_size(img.width, img.height, resize)
    img = img.resize(new, PIL_FILTERS[interpolation])
    return np.asarray(img.crop(centre_box(new[0], new[1], size)))


def reference_normalize(
    hwc: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float64 (..., 3, H, W): (value / 255 - mean) / std per channel."""
    scaled = (hwc.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    return np.moveaxis(scaled, -1, -3)


def ramp_after_resize_crop(width: int, height: int, resize: int, size: int) -> np.ndarray:
    """The exact (3, size, size) values :func:`ramp` should become, from geometry alone.

    Each output pixel centre maps back to a source coordinate; a resampling filter keeps a
    linear ramp linear as long as its support stays inside the image, which holds for the
    downscales used in the tests. No resampling library is involved.
    """
    new_w, new_h = short_side_size(width, height, resize)
    left, top, _, _ = centre_box(new_w, new_h, size)
    cols = (np.arange(size) + left + 0.5) * (width / new_w) - 0.5
    rows = (np.arange(size) + top + 0.5) * (height / new_h) - 0.5
    red = np.broadcast_to(50.0 + cols, (size, size))
    green = np.broadcast_to((20.0 + rows)[:, None], (size, size))
    return np.stack([red, green, np.full((size, size), 200.0)])


class QuadrantProbe(nn.Module):
    """A stand-in network whose 12 logits are its input's quadrant means, one per channel.

    Logit ``3 * q + c`` is the mean of channel ``c`` (R, G, B) over quadrant ``q`` (top
    left, top right, bottom left, bottom right) of the normalised input, so a prediction
    says exactly which colour the network saw where.
    """

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        parts = x.float().reshape(n, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5))  # (n, c, 2, 2)
        return parts.permute(0, 2, 3, 1).reshape(n, 4 * c)


def probe_logits(chw: np.ndarray) -> np.ndarray:
    """:class:`QuadrantProbe`'s output for one (3, H, W) input, computed with numpy."""
    _, h, w = chw.shape
    halves = [(slice(0, h // 2), slice(0, w // 2)), (slice(0, h // 2), slice(w // 2, w))]
    halves += [(slice(h // 2, h), slice(0, w // 2)), (slice(h // 2, h), slice(w // 2, w))]
    return np.array([chw[c, rows, cols].mean() for rows, cols in halves for c in range(3)])


def centred_log_probs(probabilities: np.ndarray) -> np.ndarray:
    """Logits up to their (lost) common offset: log-probabilities minus their mean."""
    logs = np.log(probabilities)
    return logs - logs.mean()


def as_batch(hwc: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> uint8 (3, H, W) tensor, the layout of the decoded images."""
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).contiguous()
