"""Image folders: ``root/<class>/.../<image>`` (ImageNet's layout), scanned once, decoded per sample.

Labels come from the first-level sub-folder (deeper folders belong to their first-level class); files
directly in the root are class ".". A file that cannot be decoded raises ``FastByolError`` naming it:
the loader replaces it by the next image of the stream, counts it and lists it in the run directory.
"""

from __future__ import annotations

import io
import os
import sys
from typing import IO

from PIL import Image, ImageFile

from fastbyol.errors import FastByolError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""Extensions scanned, compared case-insensitively."""

ROOT_CLASS = "."
"""Class name of the images that sit directly in the scanned folder."""


def _is_image_name(name: str) -> bool:
    # Hidden files (".DS_Store", macOS "._x.jpg" resource forks) are never images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(path: str, what: str = "data.path") -> tuple[list[str], list[int], list[str]]:
    """(file paths sorted, their integer labels, class names) of the images under ``path``.

    Class names are the first-level sub-folders that hold at least one image (at any depth), in sorted
    order, labels their indices; images directly in ``path`` are class "." with label 0. Hidden files
    and folders (names starting with ".") are skipped; symbolic links are followed. ``what`` names the
    setting the error messages tell the user to fix.
    """
    if not os.path.exists(path):
        raise FastByolError(f"data folder {path} does not exist: set {what} to a folder of images "
                            "(one sub-folder per class)")
    if not os.path.isdir(path):
        raise FastByolError(f"data path {path} is not a folder: set {what} to the folder that holds the "
                            "images (one sub-folder per class)")
    _refuse_split_root(path, what)
    found: list[tuple[str, str]] = []  # (path, class)
    seen = {_dir_key(path)}  # every folder walked, by (device, inode): a link back to one is not walked again
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            key = _dir_key(os.path.join(dirpath, d))
            if key is None or key in seen:  # a link loop (or a second link to a folder already read)
                skipped.append(os.path.join(dirpath, d))
                continue
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        rel = os.path.relpath(dirpath, path)
        cls = ROOT_CLASS if rel == os.curdir else rel.split(os.sep, 1)[0]
        found += [(os.path.join(dirpath, name), cls) for name in filenames if _is_image_name(name)]
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"fastbyol: warning: {len(skipped)} folder link(s) under {path} lead to a folder already read (a link "
              f"loop or a duplicate) and were skipped: {', '.join(skipped[:3])}{more}", file=sys.stderr, flush=True)
    if not found:
        raise FastByolError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}, any case) found in {path} or its "
                            f"sub-folders: put the images there (one sub-folder per class) or fix {what}")
    found.sort()
    names = {cls for _, cls in found}
    # "." first whatever it sorts against (a folder named "!x" sorts before "."): root images are label 0.
    classes = ([ROOT_CLASS] if ROOT_CLASS in names else []) + sorted(names - {ROOT_CLASS})
    label_of = {cls: i for i, cls in enumerate(classes)}
    return [p for p, _ in found], [label_of[cls] for _, cls in found], classes


def _dir_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of the folder ``path`` leads to (following links); None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _refuse_split_root(path: str, what: str) -> None:
    """A dataset root (``train/`` and ``val/`` beside each other, as ``fastbyol data make`` writes) is not a folder
    of classes: read as one, its validation images would train the network as a second "class"."""
    try:
        entries = {e.name for e in os.scandir(path) if e.is_dir()}
    except OSError:
        return
    if {"train", "val"} <= entries:
        train = os.path.join(path, "train")
        raise FastByolError(f"{path} holds train/ and val/ splits, not classes: set {what}={train} (reading both "
                            "would pretrain on the validation images)")


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` and decode it fully as an RGB image (grayscale, CMYK, palette, alpha converted).

    Raises ``FastByolError("cannot decode image <path>: <reason>")`` on any failure: missing, empty,
    not an image, corrupt or truncated. Truncation is detected because PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default; this function refuses to run otherwise,
    since PIL would then pad a truncated JPEG with grey and say nothing).
    """
    return _decode_rgb(path, path)


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """``load_rgb`` of an image file's bytes already in memory (a tar shard's member): the same PIL
    decode, the same RGB conversion, the same errors, naming the image ``name``."""
    return _decode_rgb(io.BytesIO(data), name)


def _decode_rgb(file: str | IO[bytes], name: str) -> Image.Image:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise FastByolError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another library or script), "
                            "so truncated images would load silently: set it back to False")
    try:
        # Leaving the `with` closes the file; the pixels decoded by load() stay in memory.
        with Image.open(file) as img:
            img.load()  # decode now: PIL decodes lazily, and a corrupt file must fail here, not later
            return _to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FastByolError(f"cannot decode image {name}: {reason}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA") or "transparency" in img.info:
        # Palette transparency converts through RGBA (PIL warns on a direct P -> RGB); the alpha
        # channel is dropped, as the official tf.image.decode_image(channels=3) does.
        img = img.convert("RGBA")
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF): scale to 8 bits; a direct convert would clip at 255 (white).
        img = img.convert("I").point(lambda v: v / 256, "L")
    return img.convert("RGB")


class ImageFiles:
    """``images[i] -> (RGB PIL image, label)`` over scanned files; decoding errors raise
    ``FastByolError``. ``name``/``read`` give a file's path and encoded bytes (what the DALI feed reads)."""

    def __init__(self, paths: list[str], labels: list[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels = paths, labels

    @classmethod
    def scan(cls, path: str) -> ImageFiles:
        """All images under ``path`` (see ``scan_image_folder``)."""
        paths, labels, _ = scan_image_folder(path)
        return cls(paths, labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index]), self.labels[index]

    def name(self, index: int) -> str:
        """The file's path, as messages name it."""
        return self.paths[index]

    def read(self, index: int) -> bytes:
        """The file's bytes as stored (no decode); ``FastByolError`` naming it if it cannot be read."""
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise FastByolError(f"cannot read image {path}: {e}") from None

    def exclude_hint(self) -> str:
        """How to keep an image that only DALI's decoder refuses out of a run."""
        root = os.path.commonpath(self.paths) if self.paths else "DIR"
        return (f"run `fastbyol data check --full {root}` and set data.file_list to the clean list it writes, "
                "or remove the file")
