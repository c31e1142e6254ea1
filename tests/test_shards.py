"""Tar shards (issue 19): ``fastbyol data pack`` writes an image folder as WebDataset shards with an index, and
``data.source=shards`` gives bit for bit the folder's batches through both pipelines (same order, crops and
labels; rank sharding and resume included), skips corrupt members at the folder's positions, uses a truncated
shard's readable part, and refuses a broken pack with one line naming the fix."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from multirank import REPO, assert_same_training
from test_bad_data import _seed_folder

from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.data import shards as S
from fastbyol.data.builders import make_digits
from fastbyol.data.folder import scan_image_folder
from fastbyol.data.loader import DataSource, build_source
from fastbyol.data.views import Batch
from fastbyol.engine import checkpoint
from fastbyol.engine.trainer import resume_run, start_run
from fastbyol.errors import FastByolError

SHARD_SIZE = 64_000  # the digits' 1,438 train images (~0.8 KB each) make 23 shards


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_digits(str(root / "d"), size=16)
    return root / "d" / "train"


@pytest.fixture(scope="module")
def packed(digits: Path) -> tuple[Path, S.PackReport]:
    out = digits.parent.parent / "shards"
    return out, S.pack_folder(str(digits), str(out), SHARD_SIZE)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """test_bad_data's folder of every kind of bad file (empty, random bytes, truncated JPEG, text named .png,
    a decompression bomb) beside good ones of every mode, and its shards."""
    root = tmp_path_factory.mktemp("bad")
    _seed_folder(root / "data")
    S.pack_folder(str(root / "data"), str(root / "shards"), 20_000)
    return root / "data", root / "shards"


def _source(kind: str, path: Path, *extra: str) -> DataSource:
    cfg = build_config("digits", overrides=[f"data.source={kind}", f"data.path={path}", "data.image_size=16",
                                            "data.workers=0", "data.loader=torch", *extra])
    return build_source(cfg.data, 0, torch.device("cpu"))


def _skipped_rel(message: str, root: Path) -> str:
    """The image a skip message (or an image's name) names, relative to the packed folder: a folder's path
    relative to ``root``; a shard member's '(rel)'."""
    member = re.search(r"\.tar:\S+ \((.+?)\)(?::|$)", message)
    if member:
        return member[1]
    return os.path.relpath(message.split(" image ", 1)[1].split(": ", 1)[0], root)


def _assert_same_batches(a: list[Batch], b: list[Batch], root: Path | None = None) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.views.view1, y.views.view1) and torch.equal(x.views.view2, y.views.view2)
        assert x.labels is not None and y.labels is not None and torch.equal(x.labels, y.labels)
        if root is not None:
            assert [_skipped_rel(m, root) for m in x.skipped] == [_skipped_rel(m, root) for m in y.skipped]


def test_pack_writes_the_folder_as_tar_shards(digits: Path, packed: tuple[Path, S.PackReport]) -> None:
    out, report = packed
    paths, labels, classes = scan_image_folder(str(digits))
    meta = json.loads((out / S.INDEX_NAME).read_text())
    assert report.samples == meta["samples"] == len(paths) == 1438
    assert report.classes == meta["classes"] == classes
    assert [s["name"] for s in meta["shards"]] == [f"shard-{k:06d}.tar" for k in range(len(meta["shards"]))]
    assert sum(s["samples"] for s in meta["shards"]) == len(paths) and len(meta["shards"]) > 10
    assert sorted(p.name for p in out.iterdir()) == sorted([S.INDEX_NAME, S.SAMPLES_NAME,
                                                            *(s["name"] for s in meta["shards"])])  # no temp files
    index = S.open_index(str(out))
    i = 0
    for info in meta["shards"]:
        data = (out / info["name"]).read_bytes()
        assert len(data) == info["bytes"] <= SHARD_SIZE
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        with tarfile.open(out / info["name"]) as tar:  # Python's own reader: a plain tar
            members = tar.getmembers()
            assert len(members) == 2 * info["samples"]
            for image, cls in zip(members[::2], members[1::2]):
                assert image.name == f"{i:09d}.jpg" and cls.name == f"{i:09d}.cls"
                assert tar.extractfile(image).read() == Path(paths[i]).read_bytes()  # type: ignore[union-attr]
                assert tar.extractfile(cls).read() == str(labels[i]).encode()  # type: ignore[union-attr]
                assert image.offset_data == index.offset[i] and image.size == index.size[i]
                assert index.path(i) == os.path.relpath(paths[i], digits) and index.labels[i] == labels[i]
                i += 1
    assert i == len(paths)
    again = S.pack_folder(str(digits), str(out.parent / "again"), SHARD_SIZE)
    assert [s.sha256 for s in again.shards] == [s["sha256"] for s in meta["shards"]]  # deterministic
    one_each = S.pack_folder(str(digits / "3"), str(out.parent / "one-each"), 1)  # a shard holds >= 1 image
    assert all(s.samples == 1 for s in one_each.shards) and len(one_each.shards) == one_each.samples > 100


def test_data_check_verifies_the_checksums(packed: tuple[Path, S.PackReport], tmp_path: Path) -> None:
    out, _ = packed
    report = S.verify_shards(str(out), full=True)
    assert report.shards > 10 and report.images == 1438 and not report.bad_shards and not report.bad_images
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # one flipped byte inside the first image
    shard.write_bytes(bytes(data))
    assert S.verify_shards(str(copy)).bad_shards == [
        ("shard-000003.tar", "sha256 differs from the index (the bytes changed since packing)")]


def test_torchvision_batches_from_shards_equal_the_folders(digits: Path, packed: tuple[Path, S.PackReport]) -> None:
    """Same seed, same batches bit for bit: from a position mid-epoch across the epoch boundary (a resume), as
    one rank or as rank r of 2; the shards read in 2 forked DataLoader workers (descriptors per process)."""
    out, _ = packed
    folder, shards = _source("folder", digits), _source("shards", out, "data.workers=2")
    start = 1438 - 24  # the last 24 positions of epoch 0, then epoch 1's permutation
    _assert_same_batches(list(folder.batches(start, 16, 3)), list(shards.batches(start, 16, 3)))
    for rank in (0, 1):
        _assert_same_batches(list(folder.batches(start, 8, 3, rank=rank, world=2)),
                             list(shards.batches(start, 8, 3, rank=rank, world=2)))
    images = S.open_shards(str(out))
    image, label = pickle.loads(pickle.dumps(images))[5]  # a spawned worker's copy opens its own descriptors
    assert np.array_equal(np.asarray(image), np.asarray(images[5][0])) and label == images[5][1]


def test_bad_images_are_skipped_at_the_folders_positions(bad: tuple[Path, Path]) -> None:
    data, out = bad
    n = len(scan_image_folder(str(data))[0])
    folder = list(_source("folder", data).batches(0, n, 2))
    from_shards = list(_source("shards", out).batches(0, n, 2))  # two epochs: every image twice
    _assert_same_batches(folder, from_shards, root=data)
    messages = [m for b in from_shards for m in b.skipped]
    names = {_skipped_rel(m, data) for m in messages}
    assert names == {"b/empty.jpg", "b/noise.jpg", "b/truncated.jpg", "b/text.png", "b/bomb.png"}
    truncated = next(m for m in messages if "b/truncated.jpg" in m)
    index = S.open_index(str(out))
    i = next(k for k in range(len(index)) if index.path(k) == "b/truncated.jpg")
    assert truncated.startswith(f"cannot decode image {index.shards[int(index.shard[i])].name}:{i:09d}.jpg "
                                "(b/truncated.jpg): ")


def test_file_list_is_packed_in_its_order(bad: tuple[Path, Path], tmp_path: Path) -> None:
    from fastbyol.data.check import check_folder, write_file_list

    data, _ = bad
    listed = tmp_path / "clean.txt"
    write_file_list(check_folder(str(data), full=True), str(listed))
    S.pack_folder(str(data), str(tmp_path / "s"), 1_000_000, file_list=str(listed))
    folder = list(_source("folder", data, f"data.file_list={listed}").batches(0, 10, 2))
    from_shards = list(_source("shards", tmp_path / "s").batches(0, 10, 2))
    _assert_same_batches(folder, from_shards)
    assert not [m for b in from_shards for m in b.skipped]
    assert S.open_index(str(tmp_path / "s")).classes == ["a", "b"]


def test_truncated_shard_is_reported_once_and_its_readable_images_used(
        digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    report = S.pack_folder(str(digits / "3"), str(copy), 40_000)  # one class (~140 images) in 4 shards
    info = report.shards[1]
    os.truncate(copy / "shard-000001.tar", info.bytes // 2)
    source = _source("shards", copy)
    (line,) = capsys.readouterr().err.splitlines()  # reported once, when opened
    index = S.open_index(str(copy))
    mine = np.flatnonzero(index.shard == 1)
    readable = int(((index.offset[mine] + index.size[mine]) <= info.bytes // 2).sum())
    assert 0 < readable < info.samples
    assert f"shard-000001.tar is truncated ({info.bytes // 2} of {info.bytes} bytes): {readable} of its " \
           f"{info.samples} images are readable" in line and "fastbyol data pack" in line
    skipped = [m for b in source.batches(0, report.samples, 1) for m in b.skipped]  # every position once
    lost = {int(i) for i in mine[readable:]}
    assert len(skipped) >= len(lost)
    assert {_skipped_rel(m, Path(".")) for m in skipped} == {index.path(i) for i in lost}
    assert all(m.startswith("cannot read image shard-000001.tar:") and "truncated" in m for m in skipped)
    last = int(mine[readable - 1])  # the last whole image: read as packed
    assert S.ShardImages(index).read(last) == (digits / "3" / index.path(last)).read_bytes()


def test_a_broken_pack_is_refused_with_the_fix(digits: Path, packed: tuple[Path, S.PackReport],
                                               tmp_path: Path) -> None:
    out, _ = packed

    def refused(folder: Path, *needles: str) -> None:
        with pytest.raises(FastByolError) as e:
            _source("shards", folder)
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "shard-000002.tar").unlink()
    refused(copy, "shard-000002.tar is missing", "fastbyol data pack")
    shutil.copy(out / "shard-000002.tar", copy)
    (copy / S.INDEX_NAME).write_text("{not json")
    refused(copy, "is unreadable", "fastbyol data pack")
    (copy / S.INDEX_NAME).unlink()
    refused(copy, "no fastbyol-shards.json (an interrupted pack)", "fastbyol data pack")
    shutil.copy(out / S.INDEX_NAME, copy)
    S.pack_folder(str(digits / "3"), str(tmp_path / "other"), SHARD_SIZE)
    shutil.copy(tmp_path / "other" / S.SAMPLES_NAME, copy)
    refused(copy, "sample table", "sha256", "fastbyol data pack")
    refused(tmp_path / "nowhere", "does not exist", "fastbyol data pack")
    refused(digits, "has no fastbyol-shards.json", "data.source=folder")
    with pytest.raises(ConfigError, match="data.path is empty but data.source=shards"):
        build_config("digits", overrides=["data.source=shards"])
    with pytest.raises(ConfigError, match="fastbyol data pack SRC OUT_DIR --file-list"):
        build_config("digits", overrides=["data.source=shards", "data.path=/x", "data.file_list=/x/l.txt"])


def test_training_from_shards_equals_the_folder_and_resumes_bitwise(
        digits: Path, packed: tuple[Path, S.PackReport], tmp_path: Path) -> None:
    """Two steps from the folder == one step from the shards, then a resume to two: every weight, BatchNorm
    statistic and momentum bit for bit."""
    out, _ = packed
    tiny = ["model.proj_hidden=32", "model.proj_dim=16", "data.image_size=16",
            "data.workers=0", "optim.batch_size=8", "run.progress=off", "run.telemetry=off", "run.ckpt_every=1",
            "run.log_every=1", f"run.out_dir={tmp_path}", "data.loader=torch"]
    start_run(build_config("smoke", overrides=[*tiny, "run.name=folder", "data.source=folder",
                                               f"data.path={digits}", "run.max_steps=2"])).train()
    start_run(build_config("smoke", overrides=[*tiny, "run.name=shards", "data.source=shards", f"data.path={out}",
                                               "run.max_steps=1"])).train()
    resumed = resume_run(str(tmp_path / "shards"), ["run.max_steps=2"])
    assert resumed.step == 1 and resumed.source.images_per_epoch == 1438
    resumed.train()

    def final(run: str) -> dict[str, Any]:
        step, path = checkpoint.list_checkpoints(tmp_path / run / "checkpoints")[0]
        assert step == 2
        return checkpoint.load(path)

    assert_same_training(final("folder"), final("shards"), atol=0, rtol=0)


def test_dali_batches_from_shards_equal_the_folders(digits: Path, packed: tuple[Path, S.PackReport],
                                                    bad: tuple[Path, Path], tmp_path: Path) -> None:
    """DALI's CPU operators: the same bytes through the same external source give the same batches, for a
    resume across the epoch boundary, for rank 1 of 2, and on bad images (a truncated JPEG stops DALI's
    decoder: the member is named and skipped at the folder's position)."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed: pip install 'fastbyol[gpu]'")
    out, _ = packed
    dali = ("data.loader=dali", "data.workers=2")
    folder, shards = _source("folder", digits, *dali), _source("shards", out, *dali)
    assert shards.kind == "dali"
    _assert_same_batches(list(folder.batches(1430, 8, 2)), list(shards.batches(1430, 8, 2)))
    _assert_same_batches(list(folder.batches(1430, 4, 2, rank=1, world=2)),
                         list(shards.batches(1430, 4, 2, rank=1, world=2)))
    data = tmp_path / "data"
    shutil.copytree(bad[0], data)
    for rel in ("a/cmyk.jpg", "a/gray16.png", "a/palette.png", "a/rgba.png", "a/png_named.jpg"):
        (data / rel).unlink()  # DALI's decoders differ from PIL's on these (tests/test_bad_data.py)
    S.pack_folder(str(data), str(tmp_path / "s"), 20_000)
    n = len(scan_image_folder(str(data))[0])
    folder_batches = list(_source("folder", data, *dali).batches(0, n, 1))
    shard_source = _source("shards", tmp_path / "s", *dali)
    _assert_same_batches(folder_batches, list(shard_source.batches(0, n, 1)), root=data)
    assert [_skipped_rel(name, data) for name in shard_source.undecodable] == ["b/truncated.jpg"]  # type: ignore[attr-defined]


def _fastbyol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastbyol", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("fastbyol: error: ") and all(n in line for n in needles), line


def test_cli_pack_and_its_errors(digits: Path, packed: tuple[Path, S.PackReport], tmp_path: Path) -> None:
    ok = _fastbyol("data", "pack", str(digits / "7"), str(tmp_path / "s"), "--shard-size", "20KB")
    sevens = len(list((digits / "7").iterdir()))
    assert ok.returncode == 0 and f"packed {sevens} images (1 classes)" in ok.stdout, ok.stderr
    assert len(json.loads((tmp_path / "s" / S.INDEX_NAME).read_text())["shards"]) > 2
    _one_error_line(_fastbyol("data", "pack", str(tmp_path / "missing"), str(tmp_path / "o")),
                    "does not exist", "SRC")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _one_error_line(_fastbyol("data", "pack", str(tmp_path / "empty"), str(tmp_path / "o")), "no image files")
    _one_error_line(_fastbyol("data", "pack", str(digits / "7"), str(tmp_path / "s")),
                    "already holds shards", "another OUT_DIR")
    _one_error_line(_fastbyol("data", "pack", str(digits / "7"), str(tmp_path / "o"), "--shard-size", "1XB"),
                    "--shard-size '1XB' is not a size", "1GB")
    assert not (tmp_path / "o").exists()  # refused before anything was written
    out, _ = packed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.truncate(copy / "shard-000000.tar", 1000)
    _one_error_line(_fastbyol("data", "check", str(copy)), "1 of", "shard-000000.tar (1000 bytes")
    checked = _fastbyol("data", "check", str(out))
    assert checked.returncode == 0 and "sizes and sha256 match the index" in checked.stdout


def test_an_imagenet_sized_index_opens_in_seconds(tmp_path: Path) -> None:
    """1,281,167 samples in 140 shards (sparse files of the indexed size): the index loads, is checked against
    the shards, and names a sample, in well under the seconds a run may spend on it."""
    n, shards = 1_281_167, 140
    per = -(-n // shards)
    shard = (np.arange(n) // per).astype(np.uint32)
    size = np.full(n, 110_000, dtype=np.uint64)
    offset = (np.arange(n) % per).astype(np.uint64) * np.uint64(111_616) + np.uint64(512)
    rels = [f"n{c:08d}/n{c:08d}_{i}.JPEG".encode() for i, c in enumerate(np.arange(n) // 1282)]
    path_end = np.cumsum([len(r) for r in rels], dtype=np.uint64)
    buf = io.BytesIO()
    np.savez(buf, shard=shard, offset=offset, size=size, label=(np.arange(n) // 1282).astype(np.uint32),
             path_end=path_end, path_bytes=np.frombuffer(b"".join(rels), dtype=np.uint8))
    (tmp_path / S.SAMPLES_NAME).write_bytes(buf.getvalue())
    counts = np.bincount(shard, minlength=shards)
    infos = [{"name": f"shard-{k:06d}.tar", "samples": int(counts[k]), "bytes": int(counts[k]) * 111_616 + 1024,
              "sha256": "0" * 64} for k in range(shards)]
    for info in infos:
        with open(tmp_path / str(info["name"]), "wb") as f:
            f.truncate(int(info["bytes"]))  # sparse: no data written
    (tmp_path / S.INDEX_NAME).write_text(json.dumps({
        "format": S.FORMAT, "version": S.VERSION, "source": "/data/imagenet/train", "samples": n,
        "classes": [str(c) for c in range(1000)], "key_digits": 9, "shards": infos,
        "samples_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
    t0 = time.perf_counter()
    images = S.open_shards(str(tmp_path))
    seconds = time.perf_counter() - t0
    assert len(images) == n and images.name(n - 1) == f"shard-000139.tar:{n - 1:09d}.jpeg ({rels[-1].decode()})"
    assert seconds < 5, seconds
    print(f"ImageNet-sized index opened in {seconds:.2f} s")


def test_benchmark_quick_run(tmp_path: Path) -> None:
    """benchmarks/shard_read.py --quick (tests/test_benchmarks.py's pattern): folder and shard rows, read only
    and read + decode, with positive rates and the environment."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.shard_read", "--quick", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*-shard-read.csv")
    rows = list(csv.DictReader(path.open()))
    assert {(r["source"], r["work"]) for r in rows} == {(s, w) for s in ("folder", "shards")
                                                        for w in ("read", "read+decode")}
    for row in rows:
        assert row["torch"] == torch.__version__ and row["commit"]
        assert float(row["img_per_s"]) > 0 and float(row["mb_per_s"]) > 0 and int(row["images"]) > 0
