"""The demo's shapes: ten large, distinct silhouettes whose class survives BYOL's crops and colour jitter.

Image ``index`` belongs to class ``index % 10``. The class decides only the silhouette, drawn upright
(no rotation: BYOL's augmentations teach no rotation invariance, so a rotated class would be a nuisance
the method cannot learn to ignore): circle, square, diamond, triangle pointing up, triangle pointing
down, plus, diagonal cross, ring, two horizontal bars, two vertical bars. All ten are mirror symmetric,
so the horizontal flip of the views keeps the class.

Everything else is random per image, seeded by (seed, index) alone: the radius (22-40% of the side), the
position (the centre a radius from each edge, so a shape at most touches the border), a uniform background
colour and a foreground colour whose grey level differs from it by at least 0.25 (so the silhouette is always
visible), and gaussian pixel noise (std 0.03, ~8 of 255). The nuisances are the ones BYOL's views vary,
colour, position and scale, so the raw pixels and a random network sit far below what a learned encoder can
reach (benchmarks/NOTES.md, issue 16: a supervised ResNet-18 reaches 96.8% in 300 steps, SimCLR's linear
probe 48.6%, the pixels' 17.0%). Shapes are rendered at 4x4 supersampling, so edges are anti-aliased at 32 px.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "diamond", "triangle_up", "triangle_down", "plus", "x", "ring", "hbars",
           "vbars")
SUPERSAMPLE = 4
RADIUS = (0.22, 0.40)
"""Shape radius as a fraction of the image side."""
MIN_GREY_GAP = 0.25
"""Least difference of mean grey level between foreground and background, on a 0..1 scale."""
NOISE_STD = 0.03
_MASK64 = (1 << 64) - 1


def silhouette(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``name`` at coordinates (x, y) in units of its radius, centred at 0, y down."""
    ax, ay = np.abs(x), np.abs(y)
    if name == "circle":
        return x * x + y * y <= 1
    if name == "square":
        return (ax <= 0.85) & (ay <= 0.85)
    if name == "diamond":
        return ax + ay <= 1.1
    if name == "triangle_up":
        return (y <= 0.8) & (y >= 2 * ax - 1)
    if name == "triangle_down":
        return (y >= -0.8) & (y <= 1 - 2 * ax)
    if name == "plus":
        return ((ax <= 0.3) & (ay <= 1)) | ((ay <= 0.3) & (ax <= 1))
    if name == "x":
        u, v = np.abs(x + y) / math.sqrt(2), np.abs(x - y) / math.sqrt(2)
        return ((u <= 0.3) & (v <= 1.1)) | ((v <= 0.3) & (u <= 1.1))
    if name == "ring":
        d = x * x + y * y
        return (d <= 1) & (d >= 0.45 ** 2)
    if name == "hbars":
        return (ax <= 1) & (ay >= 0.3) & (ay <= 0.9)
    if name == "vbars":
        return (ay <= 1) & (ax >= 0.3) & (ax <= 0.9)
    raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(CLASSES)}")


def _draw(index: int, seed: int, size: int) -> tuple[int, float, float, float, np.ndarray, np.ndarray,
                                                     np.random.Generator]:
    """Image ``index``'s class, radius, centre, background and foreground colours, and its generator (at
    the pixel noise, the next draw)."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed & _MASK64, index & _MASK64])
    radius = size * rng.uniform(*RADIUS)
    cx, cy = rng.uniform(radius, size - radius, 2)
    bg = rng.random(3)
    fg = rng.random(3)
    while abs(fg.mean() - bg.mean()) < MIN_GREY_GAP:  # on average ~2 draws
        fg = rng.random(3)
    return label, float(radius), float(cx), float(cy), bg, fg, rng


def shape_factors(index: int, seed: int, size: int) -> dict[str, float]:
    """The nuisances image ``index`` was drawn with (what a representation should NOT need to tell the class):
    radius and centre as fractions of the side, the two colours' grey levels, which is brighter, the gap."""
    label, radius, cx, cy, bg, fg, _ = _draw(index, seed, size)
    return {"class": float(label), "radius": radius / size, "cx": cx / size, "cy": cy / size,
            "bg_grey": float(bg.mean()), "fg_grey": float(fg.mean()), "fg_brighter": float(fg.mean() > bg.mean()),
            "grey_gap": float(abs(fg.mean() - bg.mean())),
            "hue_gap": float(np.linalg.norm((fg - fg.mean()) - (bg - bg.mean())))}


def shape_image(index: int, seed: int, size: int) -> tuple[Image.Image, int]:
    """Image ``index`` of the shapes set: (RGB ``size`` x ``size`` PIL image, label)."""
    if size < 8:
        raise ValueError(f"shape images need size >= 8, got {size}")
    label, radius, cx, cy, bg, fg, rng = _draw(index, seed, size)
    grid = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid((grid - cy) / radius, (grid - cx) / radius, indexing="ij")
    cover = silhouette(CLASSES[label], x, y).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
    pixels = bg + cover[..., None] * (fg - bg) + rng.normal(0.0, NOISE_STD, (size, size, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), "RGB"), label
