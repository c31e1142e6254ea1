"""Image-folder builders: ``root/{train,val}/<class>/<n>.jpg`` from data that ships with a package.

- digits: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes; no download),
  upscaled bicubic to ``size`` px, written as RGB JPEG, split per class into train/val.
- synthetic: procedurally drawn classes (``fastbyol.data.procedural``) of any size and count.
- shapes: the demo's ten upright silhouettes in random colours, positions and sizes (``fastbyol.data.shapes``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastbyol.data.procedural import procedural_image
from fastbyol.data.shapes import CLASSES as SHAPE_CLASSES
from fastbyol.data.shapes import shape_image
from fastbyol.errors import FastByolError


def _prepare(out: str) -> Path:
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if (root / "fastbyol-dataset.json").is_file():
            raise FastByolError(f"{out} already holds a dataset: remove it or choose another folder")
        raise FastByolError(f"{out} exists and is not empty: choose an empty or new folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create {out}: {e.strerror or e}") from None
    return root


def _split_per_class(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: the same fraction of every class, chosen at random."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_val[idx[: int(round(len(idx) * val_fraction))]] = True
    return is_val


def _write(root: Path, images: list[Image.Image], labels: np.ndarray, is_val: np.ndarray, classes: list[str],
           meta: dict[str, object], ext: str = "jpg") -> dict[str, int]:
    counts = {"train": 0, "val": 0}
    for i, (img, label) in enumerate(zip(images, labels)):
        split = "val" if is_val[i] else "train"
        d = root / split / classes[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        if ext == "jpg":
            img.save(d / f"{i:06d}.jpg", quality=95)
        else:
            img.save(d / f"{i:06d}.{ext}")
        counts[split] += 1
    tmp = root / "fastbyol-dataset.json.tmp"
    tmp.write_text(json.dumps({**meta, "classes": classes, **counts}, indent=2))
    os.replace(tmp, root / "fastbyol-dataset.json")  # written last: marks a complete dataset
    return counts


def make_digits(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    from sklearn.datasets import load_digits  # scikit-learn ships the 1,797 images in its wheel

    if not 8 <= size <= 512:
        raise FastByolError(f"digits size {size} is out of range: use 8..512 (e.g. 32)")
    digits = load_digits()
    root = _prepare(out)
    # Values 0..16 -> 0..255, upscaled bicubic, grey replicated to RGB.
    images = [Image.fromarray((x * (255 / 16)).round().astype(np.uint8), "L")
              .resize((size, size), Image.Resampling.BICUBIC).convert("RGB") for x in digits.images]
    labels = digits.target.astype(np.int64)
    return _write(root, images, labels, _split_per_class(labels, val_fraction, seed), [str(c) for c in range(10)],
                  {"source": "sklearn.datasets.load_digits", "size": size, "seed": seed})


def make_synthetic(out: str, num_classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
                   size: int = 64, seed: int = 0) -> dict[str, int]:
    if num_classes < 1 or train_per_class < 1 or val_per_class < 0 or not 8 <= size <= 1024:
        raise FastByolError("synthetic dataset needs classes >= 1, train per class >= 1, val per class >= 0 "
                            f"and size 8..1024 (got {num_classes}, {train_per_class}, {val_per_class}, {size})")
    root = _prepare(out)
    n = num_classes * (train_per_class + val_per_class)
    drawn = [procedural_image(i, seed, size, num_classes) for i in range(n)]
    labels = np.array([label for _, label in drawn], dtype=np.int64)
    # Index i has class i % num_classes; the last val_per_class of each class go to val.
    is_val = np.arange(n) >= num_classes * train_per_class
    return _write(root, [img for img, _ in drawn], labels, is_val, [f"class{c:03d}" for c in range(num_classes)],
                  {"source": "fastbyol.data.procedural", "size": size, "seed": seed})


def make_shapes(out: str, train_per_class: int = 150, val_per_class: int = 50, size: int = 32,
                seed: int = 0) -> dict[str, int]:
    if train_per_class < 1 or val_per_class < 1 or not 8 <= size <= 1024:
        raise FastByolError("shapes dataset needs train per class >= 1, val per class >= 1 and size 8..1024 "
                            f"(got {train_per_class}, {val_per_class}, {size})")
    root = _prepare(out)
    classes = len(SHAPE_CLASSES)
    n = classes * (train_per_class + val_per_class)
    drawn = [shape_image(i, seed, size) for i in range(n)]
    labels = np.array([label for _, label in drawn], dtype=np.int64)
    # Index i has class i % 10; the last val_per_class of each class go to val. PNG: JPEG would blur the
    # silhouettes' edges at 32 px.
    is_val = np.arange(n) >= classes * train_per_class
    return _write(root, [img for img, _ in drawn], labels, is_val, list(SHAPE_CLASSES),
                  {"source": "fastbyol.data.shapes", "size": size, "seed": seed}, ext="png")
