"""An image folder as tar shards (WebDataset's layout): ``fastbyol data pack`` writes them, ``data.source=shards``
reads them, through the same stream as the folder.

Cluster file systems (Lustre, GPFS, NFS) serve a million small files badly: every image costs a metadata
round trip before its first byte. Packed, a run opens ~140 files of 1 GB for ImageNet and reads each image
with one ``pread`` at a known offset.

Layout of ``OUT_DIR``:

- ``shard-000000.tar``, ``shard-000001.tar``, ...: plain ustar archives. Sample ``i`` (the i-th image of the
  folder's sorted scan, ``scan_image_folder``) is the member ``<key>.<ext>`` holding the file's bytes as they
  were (no re-encoding: a corrupt file is packed corrupt, so every sample keeps its position) followed by
  ``<key>.cls`` (its label as text); key = ``i`` zero-padded to 9 digits. Any WebDataset reader can read them.
- ``fastbyol-shards.npz``: per sample its shard, the offset and size of its bytes in the shard, its label and
  its path relative to the packed folder (numpy arrays: ImageNet's 1.28 M samples load in well under a
  second, and forked DataLoader workers share them without the copy-on-write that touching a million Python
  objects' reference counts causes).
- ``fastbyol-shards.json``: class names, sample count, the source folder, and per shard its name, sample
  count, byte size and sha256; also the npz's sha256. Written last: a folder without it is an interrupted
  pack.

Every file is written under a temp name, fsynced and renamed (``fastbyol.files``), so a crash never leaves a
half-written shard or index under its real name.

Reading keeps the folder's sample order and labels, so the stream (epoch permutations, rank sharding, per-
position augmentation seeds) is the folder's, and a run from shards is bitwise a run from the folder.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import resource
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastbyol.data.check import DEFAULT_LIST_NAME, check_bytes, read_file_list
from fastbyol.data.folder import decode_rgb, scan_image_folder
from fastbyol.errors import FastByolError
from fastbyol.files import atomic_write_bytes

INDEX_NAME = "fastbyol-shards.json"
"""The index of a shard folder: its presence marks a complete pack."""
SAMPLES_NAME = "fastbyol-shards.npz"
"""Per-sample arrays (shard, offset, size, label, path) beside the index."""
SHARD_NAME = "shard-{:06d}.tar"
FORMAT, VERSION = "fastbyol-shards", 1
KEY_DIGITS = 9
"""Member keys are the sample index zero-padded to this many digits (more if a pack ever holds 1e9 images)."""
DEFAULT_SHARD_SIZE = "1GB"

_BLOCK = 512  # tar's block: every header is one, every member's data is padded to a multiple
_END_OF_ARCHIVE = 2 * _BLOCK
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ARRAYS = ("shard", "offset", "size", "label", "path_end", "path_bytes")


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """Bytes of ``text``: plain bytes, or a number with KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB
    (powers of 1024), any case: '1GB', '64MiB', '500kb', '1.5GB', '1048576'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].lower() not in _UNITS:
        raise FastByolError(f"{flag} {text!r} is not a size: give bytes or a number with KB, MB, GB (or KiB, MiB, "
                            "GiB), e.g. 1GB")
    size = int(Fraction(match[1]) * _UNITS[match[2].lower()])
    if size < 1:
        raise FastByolError(f"{flag} {text!r} is not a positive size: use e.g. 1GB (a shard holds at least one image "
                            "whatever the size)")
    return size


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the index records it."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class PackReport:
    """What ``pack_folder`` wrote."""

    out: str
    samples: int
    classes: list[str]
    shards: list[ShardInfo]
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def format_bytes(n: int) -> str:
    """'98.3 KB', '1.23 GB': decimal units, as --shard-size reads them."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def member_extension(path: str) -> str:
    """The extension a sample's image member gets: the file's, lower case ('JPEG' -> 'jpeg'), or 'bin'."""
    ext = os.path.splitext(path)[1][1:].lower()
    return ext if ext.isascii() and ext.isalnum() and len(ext) <= 10 else "bin"


def _tar_header(name: str, size: int) -> bytes:
    # Fixed metadata (mtime 0, root, 0644): packing the same folder twice gives the same shards and sha256s.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _member_bytes(size: int) -> int:
    return _BLOCK + size + (-size % _BLOCK)


class _ShardWriter:
    """One shard being written: under a temp name, sha256 taken as the bytes go, then fsync and rename."""

    def __init__(self, out: Path, number: int) -> None:
        self.number, self.name = number, SHARD_NAME.format(number)
        self.tmp = out / f".{self.name}.{os.getpid()}.tmp"
        # O_EXCL: never clobber; mode 0666 less the umask, as any file open() makes.
        self.file = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb",
                              buffering=1 << 20)
        self.sha, self.bytes, self.samples = hashlib.sha256(), 0, 0

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Append the member ``name`` holding ``data``; returns the offset of its data in the shard."""
        self._write(_tar_header(name, len(data)))
        offset = self.bytes
        self._write(data)
        self._write(b"\0" * (-len(data) % _BLOCK))
        return offset

    def finish(self) -> ShardInfo:
        self._write(b"\0" * _END_OF_ARCHIVE)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.tmp.parent / self.name)
        return ShardInfo(self.name, self.samples, self.bytes, self.sha.hexdigest())

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _classes_of_list(rels: list[str], labels: list[int]) -> list[str]:
    """Class names of a ``data check`` file list (which holds labels only): each label's first-level folder,
    as ``scan_image_folder`` named it; '' for a label none of the listed files has."""
    names = [""] * (max(labels) + 1)
    for rel, label in zip(rels, labels):
        if not names[label]:
            parts = Path(rel).parts
            names[label] = parts[0] if len(parts) > 1 else "."
    return names


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FastByolError(f"{out} is a file: give `fastbyol data pack` a new or empty folder as OUT_DIR")
    if out.is_dir() and ((out / INDEX_NAME).exists() or any(out.glob("shard-*.tar"))):
        raise FastByolError(f"{out} already holds shards: remove them (or the folder) first, or choose another "
                            "OUT_DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create {out}: {e.strerror or e}: choose a writable OUT_DIR") from None


def _read_source(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FastByolError(f"cannot read {path}: {e.strerror or e}: fix its permissions or remove it, then run "
                            "`fastbyol data pack` again") from None


def pack_folder(src: str, out: str, shard_size: int, file_list: str = "",
                progress: Callable[[ShardInfo, int, int], None] | None = None,
                per_image: Callable[[int, int], None] | None = None) -> PackReport:
    """Write the images of ``src`` (its sorted scan, or the ``data check`` list ``file_list``) into tar shards
    of at most ``shard_size`` bytes under ``out`` (a shard holds at least one image), then the index.

    The bytes of every file go in unchanged and undecoded. ``progress(shard, images done, images)`` is called
    after each shard, ``per_image(images done, images)`` after each image (for a time-based progress line). On any
    failure the shards this call wrote are removed: nothing half-done stays behind."""
    start = time.perf_counter()
    what = "SRC (`fastbyol data pack SRC OUT_DIR`)"
    if not os.path.isdir(src):
        missing = "does not exist" if not os.path.exists(src) else "is not a folder"
        raise FastByolError(f"source folder {src} {missing}: set {what} to a folder of images (one sub-folder "
                            "per class)")
    if file_list:
        paths, labels = read_file_list(src, file_list)
        if not paths:
            raise FastByolError(f"--file-list {file_list} lists no images: run `fastbyol data check {src}` again")
        classes = _classes_of_list([os.path.relpath(p, src) for p in paths], labels)
    else:
        paths, labels, classes = scan_image_folder(src, what)
    root = Path(out)
    _prepare_out(root)
    n = len(paths)
    digits = max(KEY_DIGITS, len(str(n - 1)))
    shard = np.empty(n, dtype=np.uint32)
    offset = np.empty(n, dtype=np.uint64)
    size = np.empty(n, dtype=np.uint64)
    rels = [os.path.relpath(p, src).encode("utf-8", "surrogateescape") for p in paths]
    done: list[ShardInfo] = []
    writer: _ShardWriter | None = None
    try:
        for i, (path, label) in enumerate(zip(paths, labels)):
            data = _read_source(path)
            cls = str(label).encode()
            need = _member_bytes(len(data)) + _member_bytes(len(cls))
            if writer is not None and writer.samples and writer.bytes + need + _END_OF_ARCHIVE > shard_size:
                done.append(writer.finish())
                if progress:
                    progress(done[-1], i, n)
                writer = None
            if writer is None:
                writer = _ShardWriter(root, len(done))
            key = f"{i:0{digits}d}"
            shard[i], size[i] = writer.number, len(data)
            offset[i] = writer.add(f"{key}.{member_extension(path)}", data)
            writer.add(f"{key}.cls", cls)
            writer.samples += 1
            if per_image:
                per_image(i + 1, n)
        assert writer is not None  # n >= 1: the scan and the list refuse empty folders
        done.append(writer.finish())
        writer = None
        if progress:
            progress(done[-1], n, n)
        path_end = np.cumsum(np.array([len(r) for r in rels], dtype=np.uint64), dtype=np.uint64)
        buf = io.BytesIO()
        np.savez(buf, shard=shard, offset=offset, size=size, label=np.asarray(labels, dtype=np.uint32),
                 path_end=path_end, path_bytes=np.frombuffer(b"".join(rels), dtype=np.uint8))
        samples_bytes = buf.getvalue()
        atomic_write_bytes(root / SAMPLES_NAME, samples_bytes)
        index = {"format": FORMAT, "version": VERSION, "source": os.path.abspath(src), "file_list": file_list,
                 "samples": n, "classes": classes, "key_digits": digits, "shard_size": shard_size,
                 "samples_file": SAMPLES_NAME, "samples_sha256": hashlib.sha256(samples_bytes).hexdigest(),
                 "shards": [vars(s) for s in done]}
        atomic_write_bytes(root / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    except BaseException:
        if writer is not None:
            writer.abandon()
        for info in done:
            (root / info.name).unlink(missing_ok=True)
        (root / SAMPLES_NAME).unlink(missing_ok=True)
        raise
    return PackReport(out=out, samples=n, classes=classes, shards=done, seconds=time.perf_counter() - start)


def is_shard_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_NAME))


@dataclass
class ShardIndex:
    """A shard folder's index, checked against the shard files on disk (``open_index``)."""

    root: str
    source: str
    """The folder that was packed (absolute path at pack time)."""
    classes: list[str]
    shards: list[ShardInfo]
    key_digits: int
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    labels: np.ndarray
    path_end: np.ndarray
    path_bytes: np.ndarray
    on_disk: list[int]
    """Byte size of each shard file now (less than ``ShardInfo.bytes`` for a truncated one)."""

    def __len__(self) -> int:
        return len(self.shard)

    def path(self, index: int) -> str:
        """The sample's path relative to the packed folder."""
        start = int(self.path_end[index - 1]) if index else 0
        return self.path_bytes[start:int(self.path_end[index])].tobytes().decode("utf-8", "surrogateescape")

    def member(self, index: int) -> str:
        """The sample's image member in its shard, e.g. '000000042.jpg'."""
        return f"{index:0{self.key_digits}d}.{member_extension(self.path(index))}"

    def name(self, index: int) -> str:
        """How messages name the sample: 'shard-000001.tar:000000042.jpg (class/x.jpg)'."""
        return f"{self.shards[int(self.shard[index])].name}:{self.member(index)} ({self.path(index)})"

    def repack_hint(self) -> str:
        return f"pack again: remove {self.root}, then run `fastbyol data pack {self.source} {self.root}`"

    def truncation_notes(self) -> list[str]:
        """One line per shard shorter than the index says: which, and how many of its images are readable."""
        notes = []
        for k, info in enumerate(self.shards):
            if self.on_disk[k] < info.bytes:
                mine = self.shard == k
                readable = int(((self.offset[mine] + self.size[mine]) <= self.on_disk[k]).sum())
                notes.append(f"shard {os.path.join(self.root, info.name)} is truncated ({self.on_disk[k]} of "
                             f"{info.bytes} bytes): {readable} of its {info.samples} images are readable and "
                             f"used, the other {info.samples - readable} are skipped like unreadable images; "
                             f"copy the shard again, or {self.repack_hint()}")
        return notes


def _broken(root: str, what: str, source: str = "SRC") -> FastByolError:
    return FastByolError(f"{what}: pack again: remove {root}, then run `fastbyol data pack {source} {root}`")


def open_index(root: str) -> ShardIndex:
    """Read and check the index of the shard folder ``root``; ``FastByolError`` naming the fix when the folder,
    the index or a shard is missing or does not match. A truncated shard is not an error here (see
    ``ShardIndex.truncation_notes``): its readable images are used."""
    if not os.path.isdir(root):
        missing = "does not exist" if not os.path.exists(root) else "is not a folder"
        raise FastByolError(f"shard folder {root} {missing}: set data.path to a folder written by "
                            f"`fastbyol data pack SRC {root}`")
    index_path = os.path.join(root, INDEX_NAME)
    if not os.path.isfile(index_path):
        if list(Path(root).glob("shard-*.tar")):
            raise _broken(root, f"{root} holds shards but no {INDEX_NAME} (an interrupted pack)")
        raise FastByolError(f"{root} has no {INDEX_NAME}: set data.path to a folder written by `fastbyol data pack "
                            f"SRC {root}`, or use data.source=folder for a folder of images")
    try:
        with open(index_path, "rb") as f:
            meta = json.loads(f.read())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
                             f"version {VERSION}")
        source, n = str(meta["source"]), int(meta["samples"])
        classes = [str(c) for c in meta["classes"]]
        shards = [ShardInfo(str(s["name"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]))
                  for s in meta["shards"]]
        digits = int(meta["key_digits"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _broken(root, f"shard index {index_path} is unreadable ({_one_line(e)})") from None
    samples_path = os.path.join(root, SAMPLES_NAME)
    try:
        with open(samples_path, "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != meta.get("samples_sha256"):
            raise ValueError("its sha256 is not the one the index records (from another pack?)")
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError) as e:
        raise _broken(root, f"shard sample table {samples_path} is unreadable ({_one_line(e)})", source) from None
    index = ShardIndex(root=root, source=source, classes=classes, shards=shards, key_digits=digits,
                       shard=arrays["shard"], offset=arrays["offset"], size=arrays["size"], labels=arrays["label"],
                       path_end=arrays["path_end"], path_bytes=arrays["path_bytes"], on_disk=[])
    problem = _inconsistency(index, n)
    if problem:
        raise _broken(root, f"shard index {index_path} does not match its sample table ({problem})", source)
    for info in shards:
        try:
            index.on_disk.append(os.path.getsize(os.path.join(root, info.name)))
        except OSError:
            raise FastByolError(f"shard {os.path.join(root, info.name)} is missing (the index lists {len(shards)} "
                                f"shards): copy it back, or {index.repack_hint()}") from None
        if index.on_disk[-1] > info.bytes:
            raise FastByolError(f"shard {os.path.join(root, info.name)} is {index.on_disk[-1]} bytes but the index "
                                f"says {info.bytes}: it is not the shard that was packed; copy it again, or "
                                f"{index.repack_hint()}")
    return index


def _inconsistency(index: ShardIndex, n: int) -> str:
    """What is wrong between the index and its sample table ('' if nothing); vectorised over the samples."""
    lengths = {name: len(getattr(index, name)) for name in ("shard", "offset", "size", "labels", "path_end")}
    if set(lengths.values()) != {n} or n < 1:
        return f"{n} samples in the index, arrays of {sorted(set(lengths.values()))}"
    if int(index.shard.max()) >= len(index.shards):
        return "a sample names a shard the index does not list"
    counts = np.bincount(index.shard, minlength=len(index.shards))
    if counts.tolist() != [s.samples for s in index.shards]:
        return "per-shard sample counts differ"
    shard_bytes = np.array([s.bytes for s in index.shards], dtype=np.uint64)
    if bool(((index.offset + index.size) > shard_bytes[index.shard]).any()):
        return "a sample ends past its shard"
    if int(index.labels.max()) >= len(index.classes):
        return "a label has no class"
    if int(index.path_end[-1]) != len(index.path_bytes) or bool((np.diff(index.path_end.astype(np.int64)) < 0).any()):
        return "the path table is inconsistent"
    return ""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _max_open_shards() -> int:
    """Shard files one process keeps open: a quarter of its descriptor limit (256 at Linux's default 1024),
    leaving the rest to DataLoader pipes, sockets and checkpoints."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft if soft != resource.RLIM_INFINITY else 1 << 16) // 4)


class ShardImages:
    """``images[i] -> (RGB PIL image, label)`` over the samples of a shard folder, like ``ImageFiles`` over a
    folder (the torchvision pipeline), and ``read(i)``/``name(i)`` for the encoded bytes (the DALI feed).

    Each read is one ``os.pread`` at the offset the index gives, on a descriptor this process keeps open per
    shard (least recently used closed past ``_max_open_shards``). Descriptors are never shared between
    processes: a forked DataLoader worker sees another pid and opens its own, and pickling (spawned workers)
    drops them. One reader per thread: the DataLoader reads in worker processes, the DALI feed in one thread.
    """

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self.labels = index.labels
        self.max_open = _max_open_shards()
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": collections.OrderedDict(), "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked child: the parent's descriptors stay the parent's
            self._fds, self._pid = collections.OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(os.path.join(self.index.root, self.index.shards[shard].name), os.O_RDONLY)
        self._fds[shard] = fd
        return fd

    def name(self, index: int) -> str:
        return self.index.name(index)

    def read(self, index: int) -> bytes:
        """The sample's bytes as packed; ``FastByolError`` naming shard and member if they cannot be read
        whole (a truncated shard, a shard removed since the index was opened)."""
        shard, offset, size = int(self.index.shard[index]), int(self.index.offset[index]), int(self.index.size[index])
        try:
            fd = self._fd(shard)
            data = os.pread(fd, size, offset)
            while len(data) < size:  # pread may return less than asked (signals, some network file systems)
                more = os.pread(fd, size - len(data), offset + len(data))
                if not more:
                    break
                data += more
        except OSError as e:
            raise FastByolError(f"cannot read image {self.name(index)}: {_one_line(e)}") from None
        if len(data) < size:
            raise FastByolError(f"cannot read image {self.name(index)}: the shard ends inside it (truncated: "
                                f"{offset + len(data)} bytes, the image ends at {offset + size})")
        return data

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return decode_rgb(self.read(index), self.name(index)), int(self.labels[index])

    def exclude_hint(self) -> str:
        """How to keep an image that only DALI's decoder refuses out of a run."""
        src = self.index.source
        return (f"run `fastbyol data check --full {src}`, then pack its clean list: `fastbyol data pack {src} NEW_DIR "
                f"--file-list {os.path.join(src, DEFAULT_LIST_NAME)}`, and train from NEW_DIR")


def open_shards(root: str) -> ShardImages:
    """The images of the shard folder ``root`` (``open_index``); a truncated shard is reported here, once per
    process that opens it and only by the first rank (one line each on stderr)."""
    index = open_index(root)
    if os.environ.get("RANK", "0") == "0":  # torchrun/deepspeed set RANK; every rank opens the source
        for note in index.truncation_notes():
            print(f"fastbyol: warning: {note}", file=sys.stderr, flush=True)
    return ShardImages(index)


@dataclass
class ShardCheckReport:
    """Outcome of ``verify_shards``."""

    shards: int
    bytes: int
    bad_shards: list[tuple[str, str]]
    """(shard file name, what is wrong) for each shard whose size or sha256 differs from the index."""
    bad_images: list[tuple[str, str]]
    """--full: (sample name, reason) for each image that does not decode."""
    images: int
    seconds: float


def _sha256_of(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def verify_shards(root: str, full: bool = False) -> ShardCheckReport:
    """Check every shard of ``root`` against the index (size and sha256); ``full`` also decodes every image
    with PIL as training does (``check_bytes``), in the shards' readable part."""
    start = time.perf_counter()
    index = open_index(root)
    bad_shards: list[tuple[str, str]] = []
    for info, on_disk in zip(index.shards, index.on_disk):
        if on_disk != info.bytes:
            bad_shards.append((info.name, f"{on_disk} bytes, the index says {info.bytes} (truncated)"))
        elif _sha256_of(os.path.join(root, info.name)) != info.sha256:
            bad_shards.append((info.name, "sha256 differs from the index (the bytes changed since packing)"))
    bad_images: list[tuple[str, str]] = []
    if full:
        images = ShardImages(index)
        for i in range(len(images)):
            try:
                why = check_bytes(images.read(i), images.name(i), full=True)
            except FastByolError as e:
                why = str(e).removeprefix(f"cannot read image {images.name(i)}: ")
            if why:
                bad_images.append((images.name(i), why))
        images.close()
    return ShardCheckReport(shards=len(index.shards), bytes=sum(s.bytes for s in index.shards), bad_shards=bad_shards,
                            bad_images=bad_images, images=len(index) if full else 0,
                            seconds=time.perf_counter() - start)


def format_shard_report(report: ShardCheckReport, max_bad: int = 20) -> str:
    """The summary line, then up to ``max_bad`` images that do not decode (--full)."""
    line = (f"checked {report.shards} shards ({format_bytes(report.bytes)}) in {report.seconds:.1f} s: sizes and "
            "sha256 match the index")
    if report.images:
        line += f"; decoded {report.images} images: {report.images - len(report.bad_images)} good, " \
                f"{len(report.bad_images)} bad (skipped in training)"
    lines = [line] + [f"  {name}: {why}" for name, why in report.bad_images[:max_bad]]
    if len(report.bad_images) > max_bad:
        lines.append(f"  ... and {len(report.bad_images) - max_bad} more")
    return "\n".join(lines)
