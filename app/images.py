"""Decode an uploaded file into the network's uint8 input, or say precisely why not.

Runs in worker threads (never on the event loop). The colour conversion and resize/crop
are training's own (:mod:`wastenet.preprocess`), so the service builds exactly the tensor
that training's evaluation builds for the same file.

Limits, in the order they are checked: empty file; format sniffed from the bytes (the
client's Content-Type is not trusted) against the allowed formats; width x height from
the header against the pixel limit *before* any pixel is decoded (decompression bombs);
then the full decode, where truncated or corrupt data is reported, never half-loaded.

Large JPEGs: a JPEG whose short side is at least twice the resize size is decoded at a
reduced scale (Pillow's ``draft``: libjpeg scales by 1/2, 1/4 or 1/8 inside the inverse
DCT, to the smallest size whose short side still covers the resize size) and then goes
through the same resize and crop. On a 2-megapixel photo that halves the decode's CPU
time; the result differs from the full decode's by about one grey level on average
(tests/app/test_images.py measures the bound; README, Serving). ``jpeg_draft=False``
keeps training's exact pixels.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor

from wastenet.preprocess import resize_crop, to_rgb
from wastenet.schema import Preprocessing

# Pillow format names -> what we call them in messages.
ALLOWED_FORMATS: dict[str, str] = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "BMP": "BMP",
    "GIF": "GIF",
    "TIFF": "TIFF",
}
ALLOWED_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# "Image size (123 pixels) exceeds limit of ..." (Pillow's DecompressionBombError)
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")

# Signatures of common non-image uploads, to say what the file is instead of "unknown".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<svg", "an SVG drawing (vector images are not supported)"),
    (b"<?xml", "an XML document"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
)


class ImageRejected(Exception):
    """One file could not be used; ``status`` and ``code`` say how to report it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray  # uint8 (input_size, input_size, 3), the serving layout
    format: str
    width: int  # of the upload, before any reduction
    height: int

    @property
    def tensor(self) -> Tensor:
        """The same pixels as a uint8 (3, H, W) tensor view (training's layout)."""
        return torch.from_numpy(self.array).permute(2, 0, 1)


def configure_pillow(max_image_pixels: int) -> None:
    """Make Pillow's own decompression-bomb check use our limit (process-wide).

    We check the size ourselves before decoding, so Pillow's warning for sizes between
    the limit and twice the limit is redundant noise; its hard error stays.
    """
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _over_pixel_limit(
    filename: str, exc: Image.DecompressionBombError, max_pixels: int
) -> ImageRejected:
    """Pillow's own bomb check (at twice our limit, or a GIF frame) in our words."""
    found = _PILLOW_PIXELS.search(str(exc))
    size = f"{int(found[1]) / 1e6:.1f} MP" if found else "more pixels than allowed"
    return ImageRejected(
        413,
        "image_too_large",
        f"file {filename!r} is an image of {size}, over the limit of "
        f"{max_pixels / 1e6:.1f} MP (WASTE_MAX_IMAGE_PIXELS)",
    )


def _describe_unknown(data: bytes) -> str:
    head = data[:16].lstrip()
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            return what
    try:
        data[:512].decode("utf-8")
    except UnicodeDecodeError:
        return "not a recognised image"
    return "text, not an image"


def reduce_large_jpeg(img: Image.Image, resize_size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping the short side >= resize_size.

    Only for JPEGs at least twice the resize size (smaller ones gain nothing). Must run
    before the pixels are loaded.
    """
    if img.format == "JPEG" and min(img.size) >= 2 * resize_size:
        img.draft(img.mode, (resize_size, resize_size))


def decode_image(
    data: bytes,
    filename: str,
    preprocessing: Preprocessing,
    max_pixels: int,
    jpeg_draft: bool = True,
) -> DecodedImage:
    """Bytes of one upload -> uint8 (H, W, 3) array, or raise ImageRejected."""
    if not data:
        raise ImageRejected(422, "empty_file", f"file {filename!r} is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise ImageRejected(
            415,
            "unsupported_image_type",
            f"file {filename!r} is {_describe_unknown(data)}; send a {ALLOWED_TEXT} image",
        ) from None
    except Image.DecompressionBombError as exc:
        raise _over_pixel_limit(filename, exc, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(
            422, "undecodable_image", f"file {filename!r} has a broken image header: {exc}"
        ) from None
    with img:
        kind = ALLOWED_FORMATS.get(img.format or "", img.format or "unknown")
        width, height = img.size
        pixels = width * height
        if pixels > max_pixels:
            raise ImageRejected(
                413,
                "image_too_large",
                f"file {filename!r} is a {width}x{height} {kind} ({pixels / 1e6:.1f} MP), over "
                f"the limit of {max_pixels / 1e6:.1f} MP (WASTE_MAX_IMAGE_PIXELS)",
            )
        try:
            if jpeg_draft:
                reduce_large_jpeg(img, preprocessing.resize_size)
            img.load()
            # resize_crop's tensor is a (3, H, W) view of an (H, W, 3) array: no copy here.
            array = resize_crop(to_rgb(img), preprocessing).permute(1, 2, 0).numpy()
        except Image.DecompressionBombError as exc:
            raise _over_pixel_limit(filename, exc, max_pixels) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ImageRejected(
                422,
                "undecodable_image",
                f"file {filename!r} ({kind}) cannot be decoded: {reason}",
            ) from None
    return DecodedImage(array=array, format=kind, width=width, height=height)
