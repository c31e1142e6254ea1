"""Image folders: scanning (classes, nesting, extensions), the errors a user can fix, and decoding
every PIL mode to RGB while corrupt files fail loudly with their name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastbyol.data.folder import IMAGE_EXTENSIONS, ImageFiles, load_rgb, scan_image_folder
from fastbyol.errors import FastByolError


def _image(seed: int = 0, size: tuple[int, int] = (24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(path: Path, img: Image.Image | None = None, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or _image()).save(path, format=fmt)
    return path


def _one_line_error(excinfo: pytest.ExceptionInfo[FastByolError], *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_extensions() -> None:
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def test_scan_classes_nested_and_mixed_case(tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = {
        "dog/b.JPG": "JPEG", "dog/a.jpeg": "JPEG", "cat/x.PNG": "PNG", "cat/deep/er/y.JpEg": "JPEG",
        "cat/z.tif": "TIFF", "bird/w.webp": "WEBP", "bird/v.BMP": "BMP", "top.jpg": "JPEG",
    }
    for rel, fmt in files.items():
        _save(root / rel, fmt=fmt)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    _save(root / ".hidden" / "h.jpg", fmt="JPEG")
    _save(root / "dog" / ".x.jpg", fmt="JPEG")
    paths, labels, classes = scan_image_folder(str(root))
    assert classes == [".", "bird", "cat", "dog"]
    assert paths == sorted(paths) and len(paths) == len(files)
    by_rel = {str(Path(p).relative_to(root)): label for p, label in zip(paths, labels)}
    assert by_rel == {rel: classes.index(rel.split("/")[0] if "/" in rel else ".") for rel in files}
    assert by_rel["top.jpg"] == 0 and by_rel["cat/deep/er/y.JpEg"] == classes.index("cat")


def test_scan_without_root_files_starts_at_label_zero(tmp_path: Path) -> None:
    for name in ("b/1.png", "a/2.png", "a/3.png"):
        _save(tmp_path / name)
    paths, labels, classes = scan_image_folder(str(tmp_path))
    assert classes == ["a", "b"] and labels == [0, 0, 1]
    assert [Path(p).name for p in paths] == ["2.png", "3.png", "1.png"]


def test_scan_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(FastByolError) as e:
        scan_image_folder(str(missing))
    _one_line_error(e, str(missing), "does not exist", "data.path")
    a_file = _save(tmp_path / "one.jpg", fmt="JPEG")
    with pytest.raises(FastByolError) as e:
        scan_image_folder(str(a_file))
    _one_line_error(e, str(a_file), "not a folder", "data.path")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FastByolError) as e:
        scan_image_folder(str(empty))
    _one_line_error(e, str(empty), "no image files", ".jpg", ".png", "sub-folders")


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("LA", "PNG"), ("RGB", "JPEG"), ("1", "PNG"), ("I;16", "PNG")])
def test_load_rgb_converts_every_mode(tmp_path: Path, mode: str, fmt: str) -> None:
    rgb = _image(1)
    if mode == "I;16":
        src = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        src = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        src.info["transparency"] = 0
    else:
        src = rgb.convert(mode)
    path = _save(tmp_path / f"img.{fmt.lower()}", src, fmt)
    out = load_rgb(str(path))
    assert out.mode == "RGB" and out.size == rgb.size
    pixels = np.asarray(out).astype(int)
    if mode in ("L", "I;16", "LA"):
        gray = np.asarray(rgb.convert("L")).astype(int)
        assert np.abs(pixels - gray[..., None]).max() <= 1
    elif mode == "RGBA":
        assert np.array_equal(pixels, np.asarray(rgb))  # alpha dropped, colours kept
    elif mode == "P":
        assert np.abs(pixels - np.asarray(src.convert("RGB")).astype(int)).max() == 0
    elif mode == "CMYK":
        assert np.abs(pixels - np.asarray(rgb).astype(int)).mean() < 20  # lossy JPEG round trip


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _image(2, (64, 48)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


CORRUPT = ["truncated", "truncated_at_end", "zero_bytes", "text", "missing", "garbage_png"]


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_files_raise_with_their_name(tmp_path: Path, case: str) -> None:
    path = tmp_path / "class0" / f"broken_{case}.jpg"
    path.parent.mkdir()
    good = _jpeg_bytes()
    if case == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif case == "truncated_at_end":
        path.write_bytes(good[:-2])  # only the end-of-image marker missing
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is not a JPEG\n" * 10)
    elif case == "garbage_png":
        path = path.with_suffix(".png")
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(FastByolError) as e:
        load_rgb(str(path))
    _one_line_error(e, f"cannot decode image {path}: ")


def test_load_rgb_refuses_when_truncated_images_would_pass(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.jpg"
    good = _jpeg_bytes()
    path.write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(FastByolError, match="LOAD_TRUNCATED_IMAGES"):
        load_rgb(str(path))


def test_image_files_dataset(tmp_path: Path) -> None:
    for i, name in enumerate(("a/1.png", "a/2.jpg", "b/3.png")):
        _save(tmp_path / name, _image(i), "JPEG" if name.endswith("jpg") else "PNG")
    (tmp_path / "b" / "4.jpg").write_bytes(b"")
    images = ImageFiles.scan(str(tmp_path))
    assert len(images) == 4
    img, label = images[0]
    assert img.mode == "RGB" and label == 0
    assert np.array_equal(np.asarray(img), np.asarray(_image(0)))
    assert images[2][1] == 1
    with pytest.raises(FastByolError, match="4.jpg"):
        images[3]
    with pytest.raises(ValueError):
        ImageFiles(["x.jpg"], [])
