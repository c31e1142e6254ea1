"""Image folders: ``root/<class>/<image>`` (ImageNet's layout), scanned once, decoded per sample.

A file that cannot be decoded raises ``FastByolError`` naming it; the loader replaces it by the next
image of the stream, counts it and lists it in the run directory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile

from fastbyol.errors import FastByolError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# A truncated JPEG must fail loudly, not decode as a grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# ImageNet holds a few huge images; they are legitimate, not decompression bombs up to this size.
Image.MAX_IMAGE_PIXELS = 16_384 * 16_384


def scan_image_folder(path: str) -> tuple[list[str], list[int], list[str]]:
    """(sorted file paths, labels, class names). Labels come from the first-level sub-folder in sorted
    order; files directly in the root get the class '.'."""
    root = Path(path)
    if not root.exists():
        raise FastByolError(f"data folder {path} does not exist: set data.path to a folder of images "
                            "(one sub-folder per class)")
    if not root.is_dir():
        raise FastByolError(f"data.path {path} is a file, not a folder: point it at the folder holding the images")
    files: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        cls = rel.parts[0] if rel.parts else "."
        files += [(cls, os.path.join(dirpath, f)) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not files:
        raise FastByolError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}: "
                            "check data.path (sub-folders are searched)")
    files.sort(key=lambda cf: cf[1])
    classes = sorted({c for c, _ in files})
    index = {c: i for i, c in enumerate(classes)}
    return [f for _, f in files], [index[c] for c, _ in files], classes


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, CMYK, palette, alpha converted)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb warnings)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FastByolError(f"cannot decode image {path}: {reason}") from None


class ImageFiles:
    """(PIL image, label) by index over a scanned folder."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    @classmethod
    def scan(cls, path: str) -> ImageFiles:
        paths, labels, _ = scan_image_folder(path)
        return cls(paths, labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index]), self.labels[index]
