"""``fastbyol data check``: bad files found and reported, good ones listed in order with their labels, the
list round-trips, and the command line answers as the other subcommands do."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastbyol.data import check
from fastbyol.data.check import (
    DEFAULT_LIST_NAME,
    CheckReport,
    check_file,
    check_folder,
    format_report,
    read_file_list,
    write_file_list,
)
from fastbyol.data.folder import scan_image_folder
from fastbyol.errors import FastByolError

GOOD = [("a/a0.jpg", 0), ("a/a1.png", 0), ("a/a2.jpg", 0), ("b/b0.jpg", 1), ("b/b1.png", 1), ("b/trunc.jpg", 1)]
"""Good to the fast check, in sorted order; b/trunc.jpg is cut short after its header."""
FAST_BAD = {"a/empty.jpg", "a/notes.jpg", "b/with space.png"}


def _noise(seed: int, size: int = 64) -> Image.Image:
    # Noise, so the JPEG's entropy-coded data is large and half the file loses real pixels.
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _make_folder(root: Path) -> Path:
    for rel, _ in GOOD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    for i, (rel, _) in enumerate(GOOD[:-1]):
        _noise(i).save(root / rel, quality=90)
    whole = io.BytesIO()
    _noise(99, 128).save(whole, format="JPEG", quality=90)
    (root / "b/trunc.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "a/empty.jpg").write_bytes(b"")
    (root / "a/notes.jpg").write_text("not a picture\n")
    _noise(7).save(root / "b/with space.png")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make_folder(tmp_path / "data")


def test_check_file_fast_and_full(folder: Path) -> None:
    assert check_file(str(folder / "a/a0.jpg")) is None
    assert check_file(str(folder / "a/a1.png"), full=True) is None
    assert "empty" in (check_file(str(folder / "a/empty.jpg")) or "")
    assert "not an image" in (check_file(str(folder / "a/notes.jpg")) or "")
    # The header of a cut JPEG is intact: only the full decode sees what is missing.
    assert check_file(str(folder / "b/trunc.jpg")) is None
    reason = check_file(str(folder / "b/trunc.jpg"), full=True)
    assert reason is not None and "truncated" in reason and "\n" not in reason
    assert str(folder) not in reason  # the report names the file; the reason does not repeat it
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_fast_check_of_folder(folder: Path) -> None:
    report = check_folder(str(folder), workers=3)
    assert report.good == GOOD
    assert {rel for rel, _ in report.bad} == FAST_BAD
    assert [rel for rel, _ in report.bad] == sorted(FAST_BAD)
    assert "whitespace" in dict(report.bad)["b/with space.png"]
    assert report.classes == ["a", "b"] and report.seconds > 0


def test_full_check_also_flags_truncated_jpeg(folder: Path) -> None:
    report = check_folder(str(folder), workers=2, full=True)
    assert report.good == GOOD[:-1]
    assert {rel for rel, _ in report.bad} == FAST_BAD | {"b/trunc.jpg"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_full_check_refuses_lenient_pil(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(FastByolError, match="LOAD_TRUNCATED_IMAGES"):
        check_folder(str(folder), full=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as the caller set it


def test_order_is_the_scan_order_whatever_finishes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "many"
    for i in range(24):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i:02d}.png").write_bytes(b"")  # never opened: check_file is replaced
    paths, labels, _ = scan_image_folder(str(root))
    delays = {p: random.Random(i).uniform(0, 0.02) for i, p in enumerate(paths)}

    def slow_check(path: str, full: bool = False) -> str | None:
        time.sleep(delays[path])
        return None if int(Path(path).stem) % 5 else "multiple of five"

    monkeypatch.setattr(check, "check_file", slow_check)
    report = check_folder(str(root), workers=8)
    expected = [(os.path.relpath(p, root), lab) for p, lab in zip(paths, labels, strict=True)]
    assert report.good == [e for e in expected if int(Path(e[0]).stem) % 5]
    assert [rel for rel, _ in report.bad] == [e[0] for e in expected if not int(Path(e[0]).stem) % 5]


def test_file_list_round_trips(folder: Path, tmp_path: Path) -> None:
    report = check_folder(str(folder), workers=2)
    out = tmp_path / "list.txt"
    write_file_list(report, str(out))
    assert out.read_text().splitlines()[0] == "a/a0.jpg 0"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    paths, labels = read_file_list(str(folder), str(out))
    assert paths == [os.path.join(str(folder), rel) for rel, _ in GOOD]
    assert labels == [label for _, label in GOOD]


@pytest.mark.parametrize("line,needle", [
    ("a/a0.jpg", "line 2"),
    ("a/a0.jpg zero", "line 2"),
    ("a/a0.jpg -1", "line 2"),
    ("a/a0.jpg 0 extra", "line 2"),
    ("a/gone.jpg 0", "does not exist"),
    ("/abs/a0.jpg 0", "absolute path"),
])
def test_malformed_list_line(folder: Path, tmp_path: Path, line: str, needle: str) -> None:
    out = tmp_path / "list.txt"
    out.write_text(f"a/a1.png 0\n{line}\nb/b0.jpg 1\n")
    with pytest.raises(FastByolError, match="line 2") as info:
        read_file_list(str(folder), str(out))
    assert needle in str(info.value)


def test_report_lists_at_most_twenty_bad_files() -> None:
    report = CheckReport(good=[("x.jpg", 0)], bad=[(f"b{i:02d}.jpg", "broken") for i in range(25)],
                         classes=["."], seconds=1.25)
    lines = format_report(report, "L").splitlines()
    assert lines[0] == "checked 26 files in 1.2 s: 1 good, 25 bad; clean list -> L"
    assert lines[1] == "  b00.jpg: broken" and len(lines) == 1 + 20 + 1
    assert lines[-1] == "  ... and 5 more"


def fastbyol(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fastbyol", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_summary_and_exit_one_with_bad_files(folder: Path, tmp_path: Path) -> None:
    proc = fastbyol("data", "check", str(folder), "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # a gate for scripts: the folder is not clean (the list still is)
    out = proc.stdout.splitlines()
    listed = folder / DEFAULT_LIST_NAME
    assert out[0].startswith("checked 9 files in ")
    assert out[0].endswith(f"6 good, 3 bad; clean list -> {listed}")
    assert sorted(line.split(":")[0].strip() for line in out[1:]) == sorted(FAST_BAD)
    assert read_file_list(str(folder), str(listed))[1] == [label for _, label in GOOD]

    proc = fastbyol("data", "check", str(folder), "--full", "--out", str(tmp_path / "full.txt"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "5 good, 4 bad" in proc.stdout and "b/trunc.jpg: " in proc.stdout


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_cli_missing_or_empty_folder(tmp_path: Path, make: str) -> None:
    target = tmp_path / "nothing"
    if make == "empty":
        target.mkdir()
    proc = fastbyol("data", "check", str(target), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastbyol: error:")]
    assert len(errors) == 1 and str(target) in errors[0], proc.stderr
