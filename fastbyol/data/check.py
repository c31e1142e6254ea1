"""Check every image of a folder up front, so a corrupt file never stops a multi-hour run.

``check_folder`` opens each file that ``scan_image_folder`` finds and writes the good ones as a file list:
one line ``<path relative to the folder> <label>`` per image, the format of DALI's
``fn.readers.file(file_root=DIR, file_list=LIST)``. That format separates path and label by whitespace,
so a path that contains whitespace (a space, a tab, a newline) is reported as bad rather than risk being
read as another path; rename such files.

Two depths of check:

* fast (default): PIL reads the header and ``Image.verify()`` checks what it can without decoding (PNG
  chunk CRCs, for instance). Catches empty files, files that are not images, unknown formats and broken
  headers; a JPEG cut short after its header passes.
* full: also decodes every pixel with ``load_rgb``, exactly as training does, so truncated JPEGs are
  caught too. It costs one full decode per image.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from PIL import Image, ImageFile, UnidentifiedImageError

from fastbyol.data.folder import decode_rgb, load_rgb, scan_image_folder
from fastbyol.errors import FastByolError
from fastbyol.files import atomic_write_text

DEFAULT_LIST_NAME = "fastbyol-filelist.txt"
"""Name of the clean list written into the checked folder when no other path is given."""

_MAX_FILES_PER_TASK = 256
"""Files checked per pool task: keeps the number of pending futures small on ImageNet-sized folders
(1.28M files) while leaving several tasks per worker to balance the load."""



@dataclass
class CheckReport:
    """Outcome of ``check_folder``; both lists are in ``scan_image_folder``'s sorted order."""

    good: list[tuple[str, int]]
    """(path relative to the folder, label index) of every image that passed."""
    bad: list[tuple[str, str]]
    """(path relative to the folder, one-line reason) of every file that failed."""
    classes: list[str]
    """Class names; a label is an index into this list (classes whose files all failed keep theirs)."""
    seconds: float
    """Wall time of the scan and the check."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _require_strict_truncation() -> None:
    # With the global True, PIL pads a truncated JPEG with grey and reports nothing: the full check would
    # pass exactly the files it exists to catch. Refuse rather than flip a global other code may rely on.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise FastByolError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another library or script), "
                            "so a full check cannot see truncated images: set it back to False")


def check_file(path: str, full: bool = False) -> str | None:
    """None if ``path`` is a readable image, else a one-line reason.

    Fast by default (header and ``verify()``, no decode); ``full=True`` also decodes the pixels as
    training does (``load_rgb``), which catches truncated files. Raises ``FastByolError`` only if the
    full check cannot be trusted (PIL's ``LOAD_TRUNCATED_IMAGES`` is True).
    """
    if full:
        _require_strict_truncation()
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        return _one_line(e)
    return _check(path, path, empty, full)


def check_bytes(data: bytes, name: str, full: bool = False) -> str | None:
    """``check_file`` of an image's bytes already in memory (a tar shard's member), named ``name``."""
    if full:
        _require_strict_truncation()
    return _check(io.BytesIO(data), name, len(data) == 0, full)


def _check(file: str | IO[bytes], name: str, empty: bool, full: bool) -> str | None:
    if empty:
        return "empty file (0 bytes)"
    try:
        with Image.open(file) as img:
            img.verify()  # leaves the image unusable: the full decode reopens the file
    except UnidentifiedImageError:
        return "not an image PIL can identify (wrong extension, or not an image at all)"
    except Exception as e:  # OSError, SyntaxError, ValueError, DecompressionBombError, struct.error, ...
        return _one_line(e)
    if full:
        try:
            if isinstance(file, str):
                load_rgb(file)
            else:
                file.seek(0)
                decode_rgb(file.read(), name)
        except FastByolError as e:
            # The decoders name the image; the report already does, so keep only the reason.
            return str(e).removeprefix(f"cannot decode image {name}: ")
    return None


def _check_files(paths: list[str], full: bool) -> list[str | None]:
    return [check_file(p, full) for p in paths]


def check_folder(root: str, workers: int | None = None, full: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Check every image ``scan_image_folder(root)`` finds, ``workers`` threads at a time.

    Threads, not processes: PIL releases the GIL while it reads and decodes, and the work is mostly
    I/O for the fast check. ``workers`` defaults to ``os.cpu_count()``. Results keep the scan's sorted
    order whatever order the threads finish in. Raises ``FastByolError`` for a missing or empty folder.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise FastByolError(f"--workers {workers} is not a positive integer: use 1 or more threads")
    if full:
        _require_strict_truncation()
    start = time.perf_counter()
    paths, labels, classes = scan_image_folder(root)
    per_task = max(1, min(_MAX_FILES_PER_TASK, math.ceil(len(paths) / (4 * workers))))
    chunks = [paths[i:i + per_task] for i in range(0, len(paths), per_task)]
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # map() yields in submission order, so the results line up with `paths`.
        for chunk in pool.map(_check_files, chunks, [full] * len(chunks)):
            reasons += chunk
            if progress is not None:
                progress(len(reasons), len(paths))
    good: list[tuple[str, int]] = []
    bad: list[tuple[str, str]] = []
    for path, label, reason in zip(paths, labels, reasons, strict=True):
        rel = os.path.relpath(path, root)
        if reason is None and any(c.isspace() for c in rel):
            reason = "path contains whitespace, which the file list format (<path> <label>) cannot hold: rename it"
        if reason is None:
            good.append((rel, label))
        else:
            bad.append((rel, reason))
    return CheckReport(good=good, bad=bad, classes=classes, seconds=time.perf_counter() - start)


def write_file_list(report: CheckReport, path: str) -> None:
    """Write the good images of ``report`` to ``path`` as ``<relative path> <label>`` lines, atomically.

    Temp file in the same folder, flush, fsync, rename: an interrupted write leaves the old list (or
    none), never half a list that a run would silently train on.
    """
    text = "".join(f"{rel} {label}\n" for rel, label in report.good)
    try:
        atomic_write_text(path, text)
    except OSError as e:
        # strerror, not str(e): the latter names the temp file, which the user never asked for.
        raise FastByolError(f"cannot write file list {path}: {e.strerror or _one_line(e)}; "
                            "pass --out FILE in a writable folder") from None


def read_file_list(root: str, path: str) -> tuple[list[str], list[int]]:
    """(paths joined to ``root``, labels) of a list written by ``write_file_list``.

    Blank lines are skipped. Raises ``FastByolError`` naming the line for a line that is not
    ``<relative path> <non-negative integer label>`` or whose file does not exist under ``root``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FastByolError(f"cannot read file list {path}: {_one_line(e)}; write it with "
                            f"`fastbyol data check {root}`") from None
    paths: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"file list {path} line {number} ({line!r})"
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
            raise FastByolError(f"{where} is not '<relative path> <label>' with a non-negative integer label: "
                                "fix the line or rewrite the list with `fastbyol data check`")
        rel, label = fields
        if os.path.isabs(rel):
            raise FastByolError(f"{where} has an absolute path: paths are relative to the data folder {root}")
        full_path = os.path.join(root, rel)
        if not os.path.isfile(full_path):
            raise FastByolError(f"{where} names {full_path}, which does not exist: rewrite the list with "
                                f"`fastbyol data check {root}`")
        paths.append(full_path)
        labels.append(int(label))
    return paths, labels


def format_report(report: CheckReport, list_path: str, max_bad: int = 20) -> str:
    """The summary line, then up to ``max_bad`` bad files with their reasons."""
    lines = [f"checked {len(report.good) + len(report.bad)} files in {report.seconds:.1f} s: "
             f"{len(report.good)} good, {len(report.bad)} bad; clean list -> {list_path}"]
    lines += [f"  {rel}: {reason}" for rel, reason in report.bad[:max_bad]]
    if len(report.bad) > max_bad:
        lines.append(f"  ... and {len(report.bad) - max_bad} more")
    return "\n".join(lines)
