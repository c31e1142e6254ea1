"""Procedurally drawn images: an embedded image source that needs no download.

Used by the ``smoke`` preset and the tests, so BYOL has real structure to learn on a machine with no
dataset. Image ``index`` belongs to class ``index % num_classes``. The class decides what is drawn:

- its shape family, ``SHAPES[label % 8]``: circle, square, triangle, cross, ring, stripes, checker,
  star;
- past eight classes, a variant ``label // 8`` that keeps classes of one family apart: the number of
  copies drawn (1, 2 or 3), then filled or outlined, then a colour scheme (foreground lighter or
  darker than the background), cycling every 12 variants (96 distinct classes).

Everything else is random per image, seeded by (seed, index) alone (so any worker draws the same
image): position, scale, rotation, the foreground and background colours, and a little pixel noise.
Colours vary freely because BYOL's colour jitter is meant to make the encoder ignore them; the shape
is what survives the crops.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "star")
NOISE_HALF_WIDTH = 15
"""Pixel noise: triangular on [-15, 15] (std 6.5) in 0..255 units, the sum of two 4-bit uniforms (ten
times cheaper to draw than a gaussian)."""

_MASK64 = (1 << 64) - 1
Point = tuple[float, float]
Colour = tuple[int, int, int]


def _regular_polygon(cx: float, cy: float, radius: float, corners: int, angle: float) -> list[Point]:
    return [(cx + radius * math.cos(angle + 2 * math.pi * i / corners),
             cy + radius * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]


def _star(cx: float, cy: float, radius: float, angle: float) -> list[Point]:
    pts = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.42
        a = angle + math.pi * i / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _cross(cx: float, cy: float, radius: float, angle: float) -> list[Point]:
    # A plus sign: 12 corners, arms of half-width radius / 3.
    w = radius / 3
    local = [(w, w), (radius, w), (radius, -w), (w, -w), (w, -radius), (-w, -radius), (-w, -w), (-radius, -w),
             (-radius, w), (-w, w), (-w, radius), (w, radius)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in local]


def _rotated_rect(cx: float, cy: float, half_w: float, half_h: float, angle: float) -> list[Point]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos)
            for x, y in ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, angle: float,
                fg: Colour, filled: bool) -> None:
    stroke = max(1, round(radius / 5))
    fill = fg if filled else None
    if shape == "circle":
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=fill, outline=fg, width=stroke)
    elif shape == "square":
        draw.polygon(_regular_polygon(cx, cy, radius * 1.15, 4, angle), fill=fill, outline=fg, width=stroke)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy, radius * 1.25, 3, angle), fill=fill, outline=fg, width=stroke)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, radius * 1.1, angle), fill=fill, outline=fg, width=stroke)
    elif shape == "ring":
        # Two concentric circles; filled: a thick band, outlined: two thin ones.
        width = max(1, round(radius / (3 if filled else 8)))
        for r in (radius, radius * 0.5):
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=width)
    elif shape == "stripes":
        # Parallel bars inside the shape's disc; filled: wide bars, outlined: thin lines.
        gap = radius / 2
        half_w = gap / (2.5 if filled else 6)
        for k in (-3, -1, 1, 3):
            ox, oy = -math.sin(angle) * k * gap / 2, math.cos(angle) * k * gap / 2
            length = math.sqrt(max(radius * radius - (k * gap / 2) ** 2, (radius / 3) ** 2))
            draw.polygon(_rotated_rect(cx + ox, cy + oy, length, half_w, angle), fill=fg)
    elif shape == "checker":
        # A rotated 4 x 4 board; filled: the dark cells, outlined: the grid lines.
        cell = radius / 2
        cos, sin = math.cos(angle), math.sin(angle)
        for i in range(4):
            for j in range(4):
                x, y = (i - 1.5) * cell, (j - 1.5) * cell
                centre = (cx + x * cos - y * sin, cy + x * sin + y * cos)
                corners = _rotated_rect(*centre, cell / 2, cell / 2, angle)
                if filled and (i + j) % 2 == 0:
                    draw.polygon(corners, fill=fg)
                elif not filled:
                    draw.polygon(corners, outline=fg, width=max(1, stroke // 2))
    else:  # star
        draw.polygon(_star(cx, cy, radius * 1.25, angle), fill=fill, outline=fg, width=stroke)


def _colours(rng: np.random.Generator, dark_on_light: bool) -> tuple[Colour, Colour]:
    """(foreground, background): random hues, the value contrast set by the class's colour scheme."""
    hue_bg, hue_fg = rng.random(), rng.random()
    sat_bg, sat_fg = rng.uniform(0.0, 0.6), rng.uniform(0.3, 1.0)
    low, high = rng.uniform(0.05, 0.4), rng.uniform(0.65, 1.0)
    v_fg, v_bg = (low, high) if dark_on_light else (high, low)
    return _rgb255(hue_fg, sat_fg, v_fg), _rgb255(hue_bg, sat_bg, v_bg)


def _rgb255(hue: float, sat: float, value: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(hue, sat, value)
    return round(255 * r), round(255 * g), round(255 * b)


def procedural_image(index: int, seed: int, size: int, num_classes: int) -> tuple[Image.Image, int]:
    """Image ``index`` of the procedural set: (RGB ``size`` x ``size`` PIL image, label)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    label = index % num_classes
    shape = SHAPES[label % len(SHAPES)]
    variant = (label // len(SHAPES)) % 12
    copies = 1 + variant % 3
    filled = (variant // 3) % 2 == 0
    dark_on_light = (variant // 6) % 2 == 1
    rng = np.random.default_rng([seed & _MASK64, index & _MASK64])

    fg, bg = _colours(rng, dark_on_light)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    # Copies share the image: each gets a cell of a 1-, 2- or 3-way split, placed and sized at random.
    radius = size * rng.uniform(0.2, 0.32) / math.sqrt(copies)
    angle = rng.uniform(0, 2 * math.pi)
    for k in range(copies):
        if copies == 1:
            cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
        else:
            # Copies spread on a circle around the centre, so they do not overlap.
            a = angle + 2 * math.pi * k / copies
            spread = size * 0.25
            cx = size / 2 + spread * math.cos(a) + size * rng.uniform(-0.04, 0.04)
            cy = size / 2 + spread * math.sin(a) + size * rng.uniform(-0.04, 0.04)
        _draw_shape(draw, shape, cx, cy, radius, angle + rng.uniform(-0.3, 0.3), fg, filled)

    random_bytes = np.frombuffer(rng.bytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3)
    noise = (random_bytes >> 4).astype(np.int16) + (random_bytes & 15) - NOISE_HALF_WIDTH
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), label


class ProceduralImages:
    """``num_images`` procedural images of ``size`` px over ``num_classes`` classes, indexable like a
    dataset: ``images[i] -> (PIL image, label)``."""

    def __init__(self, num_images: int, seed: int, size: int, num_classes: int) -> None:
        if num_images < 1 or size < 1 or num_classes < 1:
            raise ValueError(f"num_images, size and num_classes must be >= 1, got {num_images}, {size}, "
                             f"{num_classes}")
        self.num_images, self.seed, self.size, self.num_classes = num_images, seed, size, num_classes

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range for {self.num_images} procedural images")
        return procedural_image(index, self.seed, self.size, self.num_classes)
