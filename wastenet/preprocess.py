"""Image -> tensor steps shared by training's evaluation and the service (torch-only).

Both sides must turn a photo into exactly the same tensor, so the colour conversion and
the resize/crop live here once. Normalisation is split from resize/crop so that the
service can move compact uint8 batches to the device and normalise there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode

from wastenet.schema import Preprocessing

WHITE = (255, 255, 255)
_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, alpha composited on white.

    Handles palette (with or without transparency), grayscale, 16/32-bit integer,
    float, CMYK and YCbCr images. Animated images give their current (first) frame.
    """
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _high_depth_to_l(img)
        mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        # 16-bit samples span 0..65535; 65535 / 257 = 255.
        scaled = arr.astype(np.float64) / 257.0
    else:
        scaled = arr
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def resize_crop(img: Image.Image, p: Preprocessing) -> Tensor:
    """Resize the short side to ``resize_size``, center-crop ``input_size``: uint8 (3, H, W)."""
    interpolation = _INTERPOLATIONS.get(p.interpolation, InterpolationMode.BILINEAR)
    img = TF.resize(img, [p.resize_size], interpolation=interpolation, antialias=True)
    img = TF.center_crop(img, [p.input_size, p.input_size])
    tensor: Tensor = TF.pil_to_tensor(img)
    return tensor


def normalize(batch: Tensor, p: Preprocessing) -> Tensor:
    """uint8 or float images (..., 3, H, W) -> float normalised with ``p.mean``/``p.std``."""
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255.0)
    mean = torch.tensor(p.mean, dtype=batch.dtype, device=batch.device).view(3, 1, 1)
    std = torch.tensor(p.std, dtype=batch.dtype, device=batch.device).view(3, 1, 1)
    return (batch - mean) / std


class EvalTransform:
    """PIL image (any mode) -> normalised float tensor (3, input_size, input_size).

    A class rather than a closure so that DataLoader workers started with ``spawn``
    (macOS, Windows, CUDA) can pickle it.
    """

    def __init__(self, p: Preprocessing) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Tensor:
        return normalize(resize_crop(to_rgb(img), self.p), self.p)


def eval_transform(p: Preprocessing) -> Callable[[Image.Image], Tensor]:
    """The evaluation and serving transform for ``p`` (picklable)."""
    return EvalTransform(p)
