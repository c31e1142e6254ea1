"""A data folder seeded with every kind of bad or unusual file (issue 8): each is either decoded correctly or
skipped, counted and listed in the run directory, and the run trains to its end."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fastbyol.config_parse import build_config
from fastbyol.data.check import check_folder
from fastbyol.data.folder import load_rgb
from fastbyol.engine.trainer import start_run
from fastbyol.telemetry.sinks import read_metrics

TINY = ["model.proj_hidden=64", "model.proj_dim=32", "model.small_stem=true", "data.image_size=16",
        "data.workers=0", "run.progress=off", "optim.batch_size=8", "optim.warmup_epochs=0.25", "run.epochs=2",
        "run.log_every=1", "run.telemetry=off", "data.loader=torch"]


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb): PIL refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def _seed_folder(root: Path) -> tuple[set[str], set[str]]:
    """(files that must decode, files that must be skipped), relative to root."""
    rng = np.random.default_rng(0)
    good, bad = set(), set()

    def pixels(h: int, w: int, c: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(pixels(40, 48)).save(root / cls / f"rgb{i}.jpg", quality=90)
            good.add(f"{cls}/rgb{i}.jpg")
    a = root / "a"
    Image.fromarray(pixels(40, 40, 1)).save(a / "gray.jpg")  # mode L
    Image.frombytes("CMYK", (40, 40), pixels(40, 40, 4).tobytes()).save(a / "cmyk.jpg")
    Image.fromarray(pixels(40, 40, 4)).save(a / "rgba.png")  # mode RGBA
    Image.fromarray(pixels(40, 40, 1).astype(np.uint16) * 257).save(a / "gray16.png")  # mode I;16
    palette = Image.fromarray(pixels(40, 40, 1) % 16).convert("P")
    palette.info["transparency"] = 0
    palette.save(a / "palette.png", transparency=0)
    Image.fromarray(pixels(40, 40)).save(a / "png_named.jpg", format="PNG")  # wrong extension, right content
    Image.fromarray(pixels(40, 40)).save(a / "UPPER.JPEG")
    Image.fromarray(pixels(1200, 1600)).save(a / "large.jpg", quality=80)  # big, decoded and cropped
    good |= {"a/gray.jpg", "a/cmyk.jpg", "a/rgba.png", "a/gray16.png", "a/palette.png", "a/png_named.jpg",
             "a/UPPER.JPEG", "a/large.jpg"}
    b = root / "b"
    (b / "empty.jpg").write_bytes(b"")
    (b / "noise.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    whole = (b / "rgb0.jpg").read_bytes()
    (b / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (b / "text.png").write_text("not an image\n")
    (b / "bomb.png").write_bytes(_png_claiming(40_000, 40_000))  # 1.6 G pixels
    bad |= {"b/empty.jpg", "b/noise.jpg", "b/truncated.jpg", "b/text.png", "b/bomb.png"}
    (b / "notes.txt").write_text("not scanned: no image extension\n")
    (b / ".hidden.jpg").write_bytes(b"")  # hidden files are never read
    return good, bad


def test_every_kind_of_bad_file_is_decoded_or_skipped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    good, bad = _seed_folder(root)
    for rel in good:  # decoded correctly: RGB, the file's size
        image = load_rgb(str(root / rel))
        assert image.mode == "RGB" and image.size[0] > 0, rel
    report = check_folder(str(root), full=True)
    assert {rel for rel, _ in report.bad} == bad

    overrides = [f"run.out_dir={tmp_path}", "run.name=r", "data.source=folder", f"data.path={root}", *TINY]
    trainer = start_run(build_config("smoke", overrides=overrides))
    summary = trainer.train()
    assert summary["step"] == trainer.total_steps  # trained to its end
    listed = (tmp_path / "r" / "skipped.txt").read_text().splitlines()
    names = {line.split("cannot decode image ")[1].split(":")[0] for line in listed}
    assert {str(Path(n).relative_to(root)) for n in names} == bad
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    # Every time the stream reaches a bad file (about once per epoch; a replacement read can meet another bad
    # file) it is counted and listed: the row's count is the number of lines.
    assert rows[-1]["skipped_images"] == len(listed) >= len(bad)


def test_dali_skips_every_bad_file_too(tmp_path: Path) -> None:
    """Under DALI (CPU operators here) the feed reads each file's header before handing it over: empty,
    random-bytes, text and decompression-bomb files are skipped there. A JPEG truncated after a valid header
    reaches DALI's decoder; the source names it and rebuilds the pipeline at the same position without it
    (tests/test_dali.py). All are counted and listed as with torchvision, and the run ends normally."""
    import pytest

    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed: pip install 'fastbyol[gpu]'")
    root = tmp_path / "data"
    good, bad = _seed_folder(root)
    for rel in ("a/cmyk.jpg", "a/gray16.png", "a/palette.png", "a/rgba.png", "a/png_named.jpg"):
        (root / rel).unlink()  # DALI's own decoders differ from PIL's on these: not this test's subject
    overrides = [f"run.out_dir={tmp_path}", "run.name=d", "data.source=folder", f"data.path={root}",
                 *[o for o in TINY if o != "data.loader=torch"], "data.loader=dali", "data.workers=1"]
    trainer = start_run(build_config("smoke", overrides=overrides))
    assert trainer.source.kind == "dali"
    assert trainer.train()["step"] == trainer.total_steps
    listed = (tmp_path / "d" / "skipped.txt").read_text().splitlines()
    names = {line.split(" image ", 1)[1].split(":")[0] for line in listed}
    assert {str(Path(n).relative_to(root)) for n in names} == bad
    decoded = {line.split("cannot decode image ")[1].split(":")[0] for line in listed if "cannot decode image" in line}
    assert decoded == {str(root / "b" / "truncated.jpg")}  # found by DALI's decoder, not the header check
    assert read_metrics(tmp_path / "d" / "metrics.jsonl")[-1]["skipped_images"] == len(listed)
