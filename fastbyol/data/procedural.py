"""Procedurally drawn images: an embedded data source that needs no download.

Class ``index % num_classes`` decides a shape family (and, past eight classes, a stroke style), the
rest (position, scale, rotation, colours, background, noise) is random per image, seeded by
(seed, index). BYOL has real structure to learn from it: the shape survives the augmentations, the
colours do not.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "star")


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float = 1.0) -> list[tuple[float, float]]:
    pts = []
    for i in range(n * (2 if inner != 1.0 else 1)):
        rad = r if (inner == 1.0 or i % 2 == 0) else r * inner
        a = angle + math.pi * 2 * i / (n * (2 if inner != 1.0 else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def procedural_image(index: int, seed: int, size: int, num_classes: int) -> tuple[Image.Image, int]:
    label = index % num_classes
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[label % len(SHAPES)]
    style = label // len(SHAPES)  # classes past the eighth: hollow / thick variants
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in (np.array(bg) + 96 + rng.integers(0, 64, 3)) % 256)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.4)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    width = max(1, int(size / 16) * (1 + style % 3))
    hollow = style % 2 == 1
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=None if hollow else fg, outline=fg, width=width)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=None if hollow else fg, outline=fg, width=width)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, angle), fill=None if hollow else fg, outline=fg, width=width)
    elif shape == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fg, width=max(2, int(r / 3)))
    elif shape == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(r / 4)))
        draw.ellipse((cx - r / 4, cy - r / 4, cx + r / 4, cy + r / 4), fill=fg)
    elif shape == "stripes":
        step = max(3, int(size / 8))
        for k in range(-size, 2 * size, step * 2):
            dx, dy = math.cos(angle) * size * 2, math.sin(angle) * size * 2
            ox, oy = -math.sin(angle) * k, math.cos(angle) * k
            draw.line((size / 2 + ox - dx, size / 2 + oy - dy, size / 2 + ox + dx, size / 2 + oy + dy),
                      fill=fg, width=step)
    elif shape == "checker":
        cell = max(2, int(size / 6))
        for i in range(0, size, cell):
            for j in range(0, size, cell):
                if (i // cell + j // cell) % 2 == 0:
                    draw.rectangle((i, j, i + cell - 1, j + cell - 1), fill=fg)
    else:  # star
        draw.polygon(_polygon(cx, cy, r * 1.2, 5, angle, inner=0.45), fill=None if hollow else fg, outline=fg,
                     width=width)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), label


class ProceduralImages:
    """``num_images`` procedural images of ``size`` px over ``num_classes`` classes, by index."""

    def __init__(self, num_images: int, seed: int, size: int, num_classes: int) -> None:
        self.num_images, self.seed, self.size, self.num_classes = num_images, seed, size, num_classes

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return procedural_image(index, self.seed, self.size, self.num_classes)
