"""A synthetic 12-class "waste photo" generator (numpy + Pillow only).

The images are drawn, not photographed: each class has its own tendencies (shape family,
colour palette, texture), and the tendencies overlap on purpose (the three glass classes
share bottle and jar shapes and differ mostly by tint; plastic bottles look like glass
ones with a cap; paper and cardboard are both flat rectangles; one object in six takes
the colour of another class). Random backgrounds, position, scale, rotation, lighting,
blur, sensor noise, JPEG compression and small distractor objects keep a network from
solving the task with one pixel. A small CNN beats chance clearly in a few CPU epochs at
64 px, which is what tests, CI and the demo need on a machine without the real dataset.

Every image has its own random stream seeded by ``(seed, class, index)``, so the same
image comes out whatever the number of images per class or the subset of classes.
"""

from __future__ import annotations

import colorsys
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from wastenet.classes import CLASS_NAMES, canonical_class_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_FILE = "synthetic.json"
_STALE_NAME = re.compile(r"^(?P<cls>.+)_\d+\.(jpg|png)$")

Array = np.ndarray
# A fill maps object-frame coordinates (u, v), each (H, W), to colours (H, W, 3) in 0..255.
Fill = Callable[[Array, Array], Array]
# One drawn part: polygon vertices in object coordinates (N, 2), its fill and its opacity.
Part = tuple[Array, Fill, float]


# ---------------------------------------------------------------- colours and fills


def _hsv(h: float, s: float, v: float) -> Array:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _solid(color: Array) -> Fill:
    def fill(u: Array, v: Array) -> Array:
        return np.broadcast_to(color, (*u.shape, 3))

    return fill


def _cylinder(color: Array, highlight: float = 0.5) -> Fill:
    """Shaded like a cylinder seen from the side, with a specular stripe."""

    def fill(u: Array, v: Array) -> Array:
        x = np.clip(u, -1.0, 1.0)
        shade = 0.55 + 0.45 * np.cos(x * (np.pi / 2))
        spec = highlight * np.exp(-(((x + 0.45) / 0.12) ** 2))
        out = color * shade[..., None] + (255.0 * spec)[..., None]
        return out

    return fill


def _stripes(c1: Array, c2: Array, along_v: bool, period: float, phase: float) -> Fill:
    def fill(u: Array, v: Array) -> Array:
        t = v if along_v else u
        mask = (np.floor((t + phase) / period) % 2 == 0)[..., None]
        return np.where(mask, c1, c2)

    return fill


def _checks(c1: Array, c2: Array, period: float) -> Fill:
    def fill(u: Array, v: Array) -> Array:
        mask = ((np.floor(u / period) + np.floor(v / period)) % 2 == 0)[..., None]
        return np.where(mask, c1, c2)

    return fill


def _corrugated(color: Array, period: float) -> Fill:
    """Cardboard: fine parallel ridges."""

    def fill(u: Array, v: Array) -> Array:
        ridge = 0.88 + 0.12 * np.sin(v * (2 * np.pi / period))
        return color * ridge[..., None]

    return fill


def _speckled(color: Array, rng: np.random.Generator, strength: float) -> Fill:
    """Organic matter: blotchy brightness variation."""
    bumps = rng.uniform(-1.0, 1.0, size=(6, 2)) * np.array([0.9, 0.9])
    freq = rng.uniform(2.0, 5.0, size=6)

    def fill(u: Array, v: Array) -> Array:
        field = np.zeros_like(u)
        for (bu, bv), f in zip(bumps, freq, strict=True):
            field += np.sin((u - bu) * f) * np.cos((v - bv) * f)
        return color * (1.0 + strength * field / 3.0)[..., None]

    return fill


def _text_lines(paper: Array, ink: Array, period: float) -> Fill:
    """Printed paper: thin dark lines on a light sheet, ragged line ends."""

    def fill(u: Array, v: Array) -> Array:
        line = (np.mod(v, period) < period * 0.28) & (np.abs(u) < 0.75)
        ragged = np.sin(v * 37.0) * 0.2 + 0.55 > u
        mask = (line & ragged)[..., None]
        return np.where(mask, ink, paper)

    return fill


def _label_band(base: Fill, band: Array, top: float, bottom: float) -> Fill:
    def fill(u: Array, v: Array) -> Array:
        inside = ((v > top) & (v < bottom))[..., None]
        return np.where(
            inside, band * (0.6 + 0.4 * np.cos(np.clip(u, -1, 1)))[..., None], base(u, v)
        )

    return fill


# ---------------------------------------------------------------- shapes (object coordinates)


def _ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 28) -> Array:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cu + ru * np.cos(t), cv + rv * np.sin(t)], axis=1)


def _rect(u0: float, v0: float, u1: float, v1: float) -> Array:
    return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=np.float64)


def _bottle(rng: np.random.Generator, jar: bool = False) -> Array:
    """Outline of a bottle (narrow neck) or a jar (wide mouth), symmetric about u = 0."""
    if jar:
        body_w = rng.uniform(0.55, 0.75)
        neck_w = body_w * rng.uniform(0.7, 0.85)
        shoulder, neck_top = rng.uniform(-0.6, -0.45), -0.8
    else:
        body_w = rng.uniform(0.32, 0.45)
        neck_w = rng.uniform(0.1, 0.15)
        shoulder, neck_top = rng.uniform(-0.25, 0.0), -1.0
    neck_start = shoulder - rng.uniform(0.15, 0.3)
    t = np.linspace(0.0, 1.0, 6)
    curve_v = shoulder + (neck_start - shoulder) * t
    curve_u = body_w + (neck_w - body_w) * (1 - np.cos(t * np.pi)) / 2
    right = np.concatenate(
        [
            [[body_w * 0.92, 1.0], [body_w, 0.92]],
            np.stack([curve_u, curve_v], axis=1),
            [[neck_w, neck_top], [neck_w * 1.15, neck_top - 0.04]],
        ]
    )
    left = right[::-1] * np.array([-1.0, 1.0])
    return np.concatenate([right, left])


def _blob(rng: np.random.Generator, n: int = 18, roughness: float = 0.25) -> Array:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    radii = 1.0 - roughness * rng.random(n)
    radii = (radii + np.roll(radii, 1) + np.roll(radii, -1)) / 3.0
    aspect = rng.uniform(0.6, 1.0)
    return np.stack([radii * np.cos(t), aspect * radii * np.sin(t)], axis=1)


def _shirt(rng: np.random.Generator) -> Array:
    w, sl = rng.uniform(0.5, 0.65), rng.uniform(0.25, 0.4)
    return np.array(
        [
            [-0.2, -0.85],
            [-w, -0.75],
            [-w - sl, -0.35],
            [-w - sl * 0.5, -0.15],
            [-w, -0.35],
            [-w, 0.9],
            [w, 0.9],
            [w, -0.35],
            [w + sl * 0.5, -0.15],
            [w + sl, -0.35],
            [w, -0.75],
            [0.2, -0.85],
            [0.0, -0.7],
        ]
    )


def _shoe(rng: np.random.Generator) -> Array:
    top = rng.uniform(-0.55, -0.3)
    return np.array(
        [
            [-0.95, 0.35],
            [-0.95, top],
            [-0.55, top - 0.05],
            [-0.45, -0.1],
            [0.1, 0.0],
            [0.6, 0.05],
            [0.9, 0.2],
            [0.98, 0.35],
        ]
    )


def _crumple(poly: Array, rng: np.random.Generator, amount: float) -> Array:
    return poly + rng.normal(0.0, amount, size=poly.shape)


# ---------------------------------------------------------------- the 12 classes
#
# Each returns the parts of one object and the range of its random rotation (degrees).
# ``tint`` replaces the class colour for the "confusing colour" case.


def _glass_parts(rng: np.random.Generator, color: Array) -> list[Part]:
    body = _bottle(rng, jar=rng.random() < 0.3)
    parts: list[Part] = [(body, _cylinder(color, highlight=0.6), rng.uniform(0.6, 0.85))]
    if rng.random() < 0.4:
        parts.append((_rect(-0.3, 0.1, 0.3, 0.5), _solid(_hsv(rng.random(), 0.3, 0.9)), 0.9))
    return parts


def _glass(
    hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]
) -> Callable[[np.random.Generator, Array | None], tuple[list[Part], float]]:
    """A glass class: the same bottles and jars, told apart by the tint's HSV ranges."""

    def style(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
        color = (
            tint
            if tint is not None
            else _hsv(rng.uniform(*hue), rng.uniform(*sat), rng.uniform(*val))
        )
        return _glass_parts(rng, color), 35.0

    return style


_brown_glass = _glass(hue=(0.03, 0.1), sat=(0.6, 0.9), val=(0.3, 0.6))
_green_glass = _glass(hue=(0.22, 0.42), sat=(0.5, 0.9), val=(0.35, 0.7))
_white_glass = _glass(hue=(0.45, 0.6), sat=(0.0, 0.15), val=(0.75, 0.95))


def _plastic(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    color = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.5, 0.65), rng.uniform(0.15, 0.55), rng.uniform(0.7, 1.0))
    )
    if rng.random() < 0.6:
        body = _crumple(_bottle(rng), rng, 0.03)
        cap_w = 0.16
        cap = _rect(-cap_w, -1.12, cap_w, -0.95)
        cap_color = _hsv(rng.choice([0.0, 0.33, 0.6, 0.15]), 0.8, 0.85)
        band = _hsv(rng.random(), 0.7, 0.8)
        fill = _label_band(_cylinder(color, 0.7), band, rng.uniform(-0.1, 0.2), 0.55)
        return [(body, fill, rng.uniform(0.55, 0.8)), (cap, _solid(cap_color), 1.0)], 60.0
    bag = _crumple(_blob(rng, n=14, roughness=0.4), rng, 0.06)
    return [(bag, _speckled(color, rng, 0.25), rng.uniform(0.5, 0.75))], 180.0


def _battery(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    w = rng.uniform(0.22, 0.32)
    body_color = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.7), rng.uniform(0.1, 0.35))
    )
    band = _hsv(rng.uniform(0.06, 0.13), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.95))
    fill = _label_band(_cylinder(body_color, 0.4), band, -0.85, rng.uniform(-0.5, -0.2))
    parts: list[Part] = [
        (_rect(-w, -0.85, w, 0.9), fill, 1.0),
        (_rect(-w * 0.4, -0.97, w * 0.4, -0.85), _cylinder(_hsv(0, 0, 0.75), 0.6), 1.0),
    ]
    return parts, 90.0


def _metal(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    w, h = rng.uniform(0.4, 0.55), rng.uniform(0.7, 0.95)
    grey = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.0, 0.1), rng.uniform(0.6, 0.85))
    )
    body = np.concatenate(
        [
            _rect(-w, -h, w, h)[[1, 2]],
            _ellipse(0, h, w, w * 0.25, 16)[:9],
            _rect(-w, -h, w, h)[[3, 0]],
        ]
    )
    parts: list[Part] = [
        (body, _cylinder(grey, 0.7), 1.0),
        (_ellipse(0.0, -h, w, w * 0.25), _solid(grey * 1.1), 1.0),
    ]
    if rng.random() < 0.5:
        band = _hsv(rng.random(), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9))
        parts[0] = (body, _label_band(_cylinder(grey, 0.7), band, -h * 0.5, h * 0.6), 1.0)
    if rng.random() < 0.35:
        parts = [(_crumple(p, rng, 0.08), f, a) for p, f, a in parts]
    return parts, 180.0


def _cardboard(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    color = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.07, 0.11), rng.uniform(0.35, 0.6), rng.uniform(0.55, 0.8))
    )
    w, h = rng.uniform(0.6, 0.95), rng.uniform(0.45, 0.8)
    d = rng.uniform(0.15, 0.3)
    front = _rect(-w, -h + d, w - d, h)
    top = np.array([[-w, -h + d], [-w + d, -h], [w, -h], [w - d, -h + d]])
    side = np.array([[w - d, -h + d], [w, -h], [w, h - d], [w - d, h]])
    period = rng.uniform(0.05, 0.09)
    parts: list[Part] = [
        (front, _corrugated(color, period), 1.0),
        (top, _corrugated(color * 1.12, period), 1.0),
        (side, _corrugated(color * 0.75, period), 1.0),
    ]
    if rng.random() < 0.5:
        parts.append((_rect(-0.12, -h + d, 0.0, h), _solid(_hsv(0.1, 0.3, 0.85)), 0.8))
    return parts, 45.0


def _paper(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    sheet_color = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.1, 0.6), rng.uniform(0.0, 0.1), rng.uniform(0.85, 1.0))
    )
    ink = _hsv(0.6, 0.2, rng.uniform(0.1, 0.4))
    sheet = _crumple(_rect(-0.7, -0.95, 0.7, 0.95), rng, rng.uniform(0.0, 0.08))
    parts: list[Part] = [(sheet, _text_lines(sheet_color, ink, rng.uniform(0.1, 0.18)), 1.0)]
    if rng.random() < 0.3:
        parts.append((_rect(-0.7, -0.02, 0.7, 0.02), _solid(sheet_color * 0.8), 1.0))
    return parts, 180.0


def _biological(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    color = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.05, 0.35), rng.uniform(0.5, 0.9), rng.uniform(0.35, 0.85))
    )
    parts: list[Part] = [(_blob(rng), _speckled(color, rng, 0.35), 1.0)]
    if rng.random() < 0.5:
        c2 = _hsv(rng.uniform(0.05, 0.35), 0.7, 0.6)
        parts.append((_blob(rng) * 0.45 + rng.uniform(-0.4, 0.4, 2), _speckled(c2, rng, 0.4), 1.0))
    return parts, 180.0


def _clothes(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    c1 = (
        tint
        if tint is not None
        else _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.4, 0.95))
    )
    c2 = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 1.0))
    pattern = rng.integers(3)
    fill = (
        _solid(c1)
        if pattern == 0
        else _stripes(c1, c2, bool(rng.random() < 0.7), rng.uniform(0.1, 0.25), rng.random())
        if pattern == 1
        else _checks(c1, c2, rng.uniform(0.12, 0.25))
    )
    shape = _shirt(rng) if rng.random() < 0.7 else _crumple(_blob(rng, 12, 0.2), rng, 0.05)
    return [(_crumple(shape, rng, 0.02), fill, 1.0)], 40.0


def _shoes(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    upper = (
        tint
        if tint is not None
        else _hsv(rng.uniform(0.0, 0.12), rng.uniform(0.0, 0.7), rng.uniform(0.1, 0.9))
    )
    sole = _hsv(0.0, 0.0, rng.choice([0.1, 0.9]))
    parts: list[Part] = [
        (_shoe(rng), _cylinder(upper, 0.25), 1.0),
        (_rect(-0.97, 0.3, 0.98, 0.45), _solid(sole), 1.0),
    ]
    for k in range(3):
        parts.append(
            (
                _ellipse(-0.35 + 0.14 * k, -0.1 + 0.03 * k, 0.04, 0.04, 8),
                _solid(_hsv(0, 0, 0.95)),
                1.0,
            )
        )
    return parts, 25.0


def _trash(rng: np.random.Generator, tint: Array | None) -> tuple[list[Part], float]:
    parts: list[Part] = []
    for _ in range(int(rng.integers(4, 9))):
        centre = rng.uniform(-0.6, 0.6, 2)
        scale = rng.uniform(0.15, 0.35)
        shape = (
            _blob(rng, 8, 0.5)
            if rng.random() < 0.5
            else _crumple(_rect(-1, -0.5, 1, 0.5), rng, 0.2)
        )
        color = (
            tint
            if (tint is not None and rng.random() < 0.5)
            else _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.2, 0.8))
        )
        parts.append((shape * scale + centre, _speckled(color, rng, 0.3), 1.0))
    return parts, 180.0


_STYLES: dict[str, Callable[[np.random.Generator, Array | None], tuple[list[Part], float]]] = {
    "battery": _battery,
    "biological": _biological,
    "brown_glass": _brown_glass,
    "cardboard": _cardboard,
    "clothes": _clothes,
    "green_glass": _green_glass,
    "metal": _metal,
    "paper": _paper,
    "plastic": _plastic,
    "shoes": _shoes,
    "trash": _trash,
    "white_glass": _white_glass,
}
assert set(_STYLES) == set(CLASS_NAMES)

# The colour another class's object would have: used for the "confusing colour" case.
_TINTS: tuple[Callable[[np.random.Generator], Array], ...] = (
    lambda r: _hsv(r.uniform(0.03, 0.1), 0.8, 0.45),  # brown glass
    lambda r: _hsv(r.uniform(0.25, 0.4), 0.7, 0.55),  # green glass
    lambda r: _hsv(0.55, 0.08, 0.88),  # clear glass
    lambda r: _hsv(0.09, 0.5, 0.7),  # cardboard
    lambda r: _hsv(0.0, 0.0, 0.95),  # paper
    lambda r: _hsv(0.6, 0.05, 0.75),  # metal
    lambda r: _hsv(r.random(), 0.85, 0.8),  # any saturated colour
)


# ---------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> Array:
    kind = rng.integers(4)
    c1 = _hsv(rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.95))
    c2 = _hsv(rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.95))
    if kind == 0:  # linear gradient at a random angle
        ang = rng.uniform(0, 2 * np.pi)
        g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        t = (np.cos(ang) * g[None, :] + np.sin(ang) * g[:, None]) * 0.5 + 0.5
        return c1 * (1 - t[..., None]) + c2 * t[..., None]
    if kind == 1:  # low-frequency clouds
        low = rng.uniform(0.0, 1.0, size=(4, 4)).astype(np.float32)
        t = (
            np.asarray(
                Image.fromarray((low * 255).astype(np.uint8)).resize(
                    (size, size), Image.Resampling.BICUBIC
                ),
                dtype=np.float32,
            )[..., None]
            / 255.0
        )
        return c1 * (1 - t) + c2 * t
    if kind == 2:  # floor boards / tiles
        period = int(rng.integers(max(size // 10, 2), max(size // 3, 3)))
        idx = np.arange(size) // period
        tiles = (idx[:, None] + (idx[None, :] if rng.random() < 0.5 else 0)) % 2
        return np.where(tiles[..., None] == 0, c1, c1 * 0.8 + c2 * 0.2)
    base = np.broadcast_to(c1, (size, size, 3))  # flat with fine grain
    return base + rng.standard_normal((size, size, 1), dtype=np.float32) * 12.0


def _paint(
    canvas: Array,
    parts: Sequence[Part],
    centre: Array,
    scale: float,
    angle_deg: float,
    grid: tuple[Array, Array],
) -> None:
    """Draw object-coordinate parts onto ``canvas`` (H, W, 3 float32) in place."""
    size = canvas.shape[0]
    ang = np.deg2rad(angle_deg)
    cos, sin = np.cos(ang), np.sin(ang)
    rot = np.array([[cos, sin], [-sin, cos]])  # row vectors: p @ rot rotates by +angle
    ys, xs = grid
    for poly, fill, alpha in parts:
        pts = poly @ rot * scale + centre
        # Work inside the part's bounding box only: the fills are the costly step.
        x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        mask_img = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
        local = [(float(x - x0), float(y - y0)) for x, y in pts]
        ImageDraw.Draw(mask_img).polygon(local, fill=255)
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] * (alpha / 255.0)
        if not mask.any():
            continue
        # Inverse rotation maps pixels back into object coordinates for the fills.
        dx = (xs[y0:y1, x0:x1] - centre[0]) / scale
        dy = (ys[y0:y1, x0:x1] - centre[1]) / scale
        u = (dx * cos + dy * sin).astype(np.float32)
        v = (-dx * sin + dy * cos).astype(np.float32)
        box = canvas[y0:y1, x0:x1]
        box *= 1.0 - mask
        box += fill(u, v) * mask


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[Array, Array]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def render_image(class_name: str, index: int, size: int = 128, seed: int = 0) -> Image.Image:
    """One synthetic RGB image of ``class_name`` (either folder spelling); deterministic."""
    canonical = canonical_class_name(class_name)
    if canonical is None:
        raise ValueError(f"unknown class {class_name!r}; valid names: {', '.join(CLASS_NAMES)}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng([seed, CLASS_NAMES.index(canonical), index])
    canvas = np.array(np.broadcast_to(_background(rng, size), (size, size, 3)), dtype=np.float32)
    coords = _pixel_grid(size)

    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):  # distractors from any class
        other = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        parts, _ = _STYLES[other](rng, None)
        centre = rng.uniform(0.0, 1.0, 2) * size
        _paint(
            canvas, parts, centre, size * rng.uniform(0.08, 0.15), rng.uniform(-180, 180), coords
        )

    tint = _TINTS[int(rng.integers(len(_TINTS)))](rng) if rng.random() < 1 / 6 else None
    parts, max_rotation = _STYLES[canonical](rng, tint)
    scale = size * rng.uniform(0.25, 0.42)
    centre = size * (0.5 + rng.uniform(-0.18, 0.18, 2))
    _paint(canvas, parts, centre, scale, rng.uniform(-max_rotation, max_rotation), coords)

    # Camera: exposure, colour cast, sensor noise.
    gain = rng.uniform(0.75, 1.2) * (1.0 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    canvas *= gain
    canvas += rng.uniform(-20, 20)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2.0, 12.0)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.2)) * size / 128))
    return img


def _existing_images(out: Path) -> list[Path]:
    if not out.exists():
        return []
    return [p for p in out.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    """A step callback: tqdm when installed (train extra), else a plain counter on stderr."""
    if not enabled:
        return lambda n: None
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            print(f"\rsynthetic images: {done[0]}/{total}", end="", file=sys.stderr)
            if done[0] >= total:
                print(file=sys.stderr)

        return step
    bar = tqdm(total=total, desc="synthetic images", unit="img")

    def step_bar(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return step_bar


def generate_synthetic_dataset(
    out: Path,
    images_per_class: int = 100,
    size: int = 128,
    seed: int = 0,
    image_format: Literal["jpg", "png"] = "jpg",
    class_names: Sequence[str] = CLASS_NAMES,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``out/<class_name>/<class_name>_<i>.<ext>``; return class -> images written.

    ``class_names`` may use either folder spelling (``brown-glass`` or ``brown_glass``);
    folders are named as given. ``out`` must not already hold images unless ``overwrite``,
    which first deletes the generator's own earlier files (``<class>_<digits>.jpg|png``)
    in the class folders it writes. A ``synthetic.json`` manifest records the parameters.
    """
    out = Path(out)
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, got {images_per_class}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not class_names:
        raise ValueError("class_names is empty")
    canon = [canonical_class_name(n) for n in class_names]
    unknown = [n for n, c in zip(class_names, canon, strict=True) if c is None]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]!r}; valid names: {', '.join(CLASS_NAMES)}")
    if len(set(canon)) != len(canon):
        raise ValueError(f"class_names name a class twice: {list(class_names)}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    existing = _existing_images(out)
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} images (e.g. {existing[0]}); "
            "choose an empty folder or pass overwrite=True"
        )
    if overwrite:
        for name in class_names:
            folder = out / name
            if folder.is_dir():
                for p in folder.iterdir():
                    m = _STALE_NAME.match(p.name)
                    if p.is_file() and m and m.group("cls") == name:
                        p.unlink()

    step = _progress(images_per_class * len(class_names), progress)
    written: dict[str, int] = {}
    digits = max(4, len(str(images_per_class - 1)))
    for name in class_names:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            img = render_image(name, i, size=size, seed=seed)
            path = folder / f"{name}_{i:0{digits}d}.{image_format}"
            if image_format == "jpg":
                quality = 80 + (i * 7919 + seed) % 16  # varied compression, still deterministic
                img.save(path, format="JPEG", quality=quality)
            else:
                img.save(path, format="PNG", compress_level=1)
            step(1)
        written[name] = images_per_class
    manifest = {
        "synthetic": True,
        "note": "Drawn by training.synth; not photographs of real waste.",
        "images_per_class": images_per_class,
        "size": size,
        "seed": seed,
        "image_format": image_format,
        "classes": written,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return written
