"""Feature extraction with DataLoader workers, and the feature cache (issue 20): workers give one process's
features bit for bit; a second evaluation of the same checkpoint and data runs no forward pass; a changed
checkpoint, image or size misses the cache; a damaged cache file is recomputed with one line; the CLI flags."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_eval import _cli, tiny_checkpoint  # noqa: F401  (the fixture: a 2-step smoke run's directory)

from fastbyol.data.builders import make_synthetic
from fastbyol.data.folder import ImageFiles
from fastbyol.engine import checkpoint
from fastbyol.engine.evaluate import evaluate_encoder, load_checkpoint_encoder
from fastbyol.eval.features import FeatureCache, default_workers, extract_features

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread here and in the CLI's processes: on this 2-core machine shared with another job, two
    OpenMP threads wait for each other at every operator (three batches of four 32 px images through the
    ResNet-18: 2.4 s with two threads, 0.04 s with one, measured). The tests are about bits, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 40 px images: 12 training and 6 validation images (train/, val/)."""
    root = tmp_path_factory.mktemp("eval-data") / "d"
    make_synthetic(str(root), num_classes=3, train_per_class=4, val_per_class=2, size=40)
    return root


def _evaluate(run: Path, data: Path, cache: FeatureCache | None, size: int = SIZE,
              **kwargs: Any) -> tuple[dict[str, Any], int]:
    """``fastbyol eval``'s path in this process (a fresh load of the checkpoint, as a new command would make);
    the result and how many times the encoder ran forward."""
    loaded = load_checkpoint_encoder(str(run))
    forwards: list[int] = []
    loaded.encoder.register_forward_hook(lambda *_: forwards.append(1))
    result = evaluate_encoder(loaded.encoder, str(data), size, CPU, encoder_id=loaded.identity, cache=cache,
                              workers=0, batch_size=8, **kwargs)
    return result, len(forwards)


def test_workers_give_one_process_features_bitwise(tiny_checkpoint: Path, data: Path) -> None:  # noqa: F811
    """Centre and augmented views, 2 workers against none: same rows, same order, same bits (3 batches of 4
    over the two workers, so their batches interleave)."""
    encoder = load_checkpoint_encoder(str(tiny_checkpoint)).encoder
    files = ImageFiles.scan(str(data / "train"))
    views = {}
    for epoch in (None, 3):
        one = extract_features(encoder, files, SIZE, CPU, batch_size=4, workers=0, epoch=epoch)
        two = extract_features(encoder, files, SIZE, CPU, batch_size=4, workers=2, epoch=epoch)
        assert one[0].shape == (12, 512) and one[0].dtype == torch.float32
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]), f"epoch {epoch}"
        assert one[1].tolist() == files.labels
        views[epoch] = one[0]
    other_seed = extract_features(encoder, files, SIZE, CPU, batch_size=4, workers=2, epoch=3, seed=1)[0]
    assert not torch.equal(views[None], views[3]) and not torch.equal(other_seed, views[3])  # views differ


def test_second_evaluation_runs_no_forward_pass(tiny_checkpoint: Path, data: Path, tmp_path: Path) -> None:  # noqa: F811
    """kNN computes and caches both splits' centre features; the linear probe on the same checkpoint then reads
    them (no forward); the augmented protocol caches each epoch's training features and reads them next time."""
    cache_dir = tmp_path / "cache"
    knn, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=None)
    assert forwards == 2 + 1 and knn["feature_cache"]["computed"] == 2  # 12 + 6 images in batches of 8
    assert sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in cache_dir.iterdir()) == [
        "train-center", "val-center"]
    again, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=2)
    assert forwards == 0 and again["feature_cache"] == {"cache": str(cache_dir), "read": 2, "computed": 0}
    assert again["knn3"] == knn["knn3"]
    augmented, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), knn_k=(), linear_epochs=2,
                                    augment=True)
    assert forwards == 2 * 2 and augmented["feature_cache"]["computed"] == 2  # 2 epochs of 12 training images
    repeat, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), knn_k=(), linear_epochs=2,
                                 augment=True)
    assert forwards == 0 and repeat["linear"] == augmented["linear"]
    assert len(list(cache_dir.glob("train-augment-e*-s0-*.pt"))) == 2


def test_changed_checkpoint_image_or_size_misses_the_cache(tiny_checkpoint: Path, data: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=None)
    assert forwards == 3
    # Another checkpoint: one online weight moved.
    _, state = checkpoint.resolve_resume(str(tiny_checkpoint))
    state["model"]["online.encoder.net.conv1.weight"][0, 0, 0, 0] += 0.5
    checkpoint.save(state, tmp_path / "other" / "checkpoints", 2, keep_last=1)
    assert load_checkpoint_encoder(str(tmp_path / "other")).identity != \
        load_checkpoint_encoder(str(tiny_checkpoint)).identity
    result, forwards = _evaluate(tmp_path / "other", data, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=None)
    assert forwards == 3 and result["feature_cache"]["computed"] == 2
    # Another size.
    result, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), size=24, knn_k=(3,),
                                 linear_epochs=None)
    assert forwards == 3 and result["feature_cache"]["computed"] == 2
    # One validation image rewritten (another image's bytes): val is computed again, train is read.
    local = tmp_path / "data"
    make_synthetic(str(local), num_classes=3, train_per_class=4, val_per_class=2, size=40)
    _evaluate(tiny_checkpoint, local, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=None)
    first, second = sorted((local / "val" / "class000").iterdir())
    first.write_bytes(second.read_bytes())
    result, forwards = _evaluate(tiny_checkpoint, local, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=None)
    assert forwards == 1 and result["feature_cache"]["read"] == 1 and result["feature_cache"]["computed"] == 1


def test_damaged_cache_file_is_recomputed_with_one_line(tiny_checkpoint: Path, data: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first, _ = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir), knn_k=(3,), linear_epochs=None)
    (train_file,) = cache_dir.glob("train-center-*.pt")
    (val_file,) = cache_dir.glob("val-center-*.pt")
    clean = {p: p.read_bytes() for p in (train_file, val_file)}
    for damage in ("truncated", "one byte flipped in the features", "garbage"):
        blob = clean[train_file]
        if damage == "truncated":
            train_file.write_bytes(blob[:len(blob) // 2])
        elif damage == "garbage":
            train_file.write_bytes(b"not a cache file")
        else:
            features = torch.load(io.BytesIO(blob), weights_only=True)["features"]
            at = blob.index(features[0].numpy().tobytes())  # the stored tensor's bytes, not the zip's headers
            train_file.write_bytes(blob[:at] + bytes([blob[at] ^ 0x40]) + blob[at + 1:])
        log = io.StringIO()
        result, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir, stream=log), knn_k=(3,),
                                     linear_epochs=None)
        lines = log.getvalue().splitlines()
        assert len(lines) == 1 and str(train_file) in lines[0] and "recomputing" in lines[0], (damage, lines)
        assert forwards == 2 and result["knn3"] == first["knn3"], damage  # the 12 training images only
        assert train_file.read_bytes() == clean[train_file], damage  # written again, the same bytes
    log = io.StringIO()
    _, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(cache_dir, stream=log), knn_k=(3,), linear_epochs=None)
    assert forwards == 0 and log.getvalue() == ""


def test_unwritable_cache_says_one_line_and_keeps_the_result(tiny_checkpoint: Path, data: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    log = io.StringIO()
    result, forwards = _evaluate(tiny_checkpoint, data, FeatureCache(tmp_path / "file" / "cache", stream=log),
                                 knn_k=(3,), linear_epochs=None)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "cannot write feature cache" in lines[0] and "--no-cache" in lines[0], lines
    assert forwards == 3 and result["knn3"]["top1"] >= 0 and result["feature_cache"]["computed"] == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_for_large_sets_and_a_line_per_phase_in_a_log(  # noqa: F811
        tiny_checkpoint: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from fastbyol.engine import evaluate

    # A terminal: a live bar (with its header) for splits of at least PROGRESS_MIN_IMAGES images only.
    for threshold, shown in ((12, True), (13, False)):
        stream = _Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(evaluate, "PROGRESS_MIN_IMAGES", threshold)
        _evaluate(tiny_checkpoint, data, None, knn_k=(), linear_epochs=None)
        text = stream.getvalue()
        assert ("train features (center views) of 12 images, 0 workers" in text and "12/12" in text) == shown, text
        assert ("val features" in text) is False  # 6 validation images: under every threshold here
    # A log file (not a terminal), whatever the size: one plain line at the end of each split (and one per 30 s).
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(evaluate, "PROGRESS_MIN_IMAGES", 10_000)
    _evaluate(tiny_checkpoint, data, None, knn_k=(), linear_epochs=None)
    lines = stream.getvalue().splitlines()
    assert [line.split(": [")[0] for line in lines] == ["fastbyol: train features (center views)",
                                                         "fastbyol: val features (center views)"], lines
    assert "12/12" in lines[0] and "6/6" in lines[1] and "\r" not in stream.getvalue()


def test_default_workers_follow_the_device() -> None:
    assert default_workers(torch.device("cpu")) == 0
    assert default_workers(torch.device("cuda", 0)) == min(8, os.cpu_count() or 1)


def _cache_line(proc: subprocess.CompletedProcess[str]) -> str:
    return next((line for line in proc.stderr.splitlines() if "feature cache" in line), "")


def test_eval_cli_workers_and_cache_flags(tiny_checkpoint: Path, data: Path, tmp_path: Path) -> None:  # noqa: F811
    base = ["--data", str(data), "--size", str(SIZE)]
    proc = _cli("eval", "knn", str(tiny_checkpoint), *base, "--k", "3", "--workers", "2", "--json",
                str(tmp_path / "a.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _cache_line(proc) == f"fastbyol: feature cache {tiny_checkpoint / 'eval-cache'}: 0 read, 2 computed"
    proc = _cli("eval", "linear", str(tiny_checkpoint), *base, "--epochs", "2", "--workers", "0", cwd=tmp_path)
    assert proc.returncode == 0 and "linear probe (2 epochs" in proc.stdout, proc.stderr
    assert _cache_line(proc).endswith("eval-cache: 2 read, 0 computed")
    proc = _cli("eval", "knn", str(tiny_checkpoint), *base, "--k", "3", "--workers", "0", "--cache",
                str(tmp_path / "c"), "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert proc.returncode == 0 and _cache_line(proc).endswith(f"{tmp_path / 'c'}: 0 read, 2 computed"), proc.stderr
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert a["knn3"] == b["knn3"] and b["feature_cache"]["computed"] == 2  # 2 workers agree with none
    proc = _cli("eval", "knn", str(tiny_checkpoint), *base, "--k", "3", "--no-cache", cwd=tmp_path)
    assert proc.returncode == 0 and _cache_line(proc) == "" and f"top-1 {a['knn3']['top1']:.2f}%" in proc.stdout
    for flags, message in ((["--workers", "-1"], "--workers -1: use 0"),
                           (["--cache", str(tmp_path), "--no-cache"], "contradict each other"),
                           (["--cache", str(tmp_path / "a.json" / "x")], "cannot create the feature cache folder")):
        proc = _cli("eval", "knn", str(tiny_checkpoint), *base, *flags, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_benchmark_quick_run(tmp_path: Path) -> None:
    """benchmarks/eval_features.py --quick: one row per worker count, positive rates, features checked equal."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval_features", "--quick", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*-eval-features.csv")
    rows = list(csv.DictReader(path.open()))
    assert [int(r["workers"]) for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["torch"] == torch.__version__ and row["commit"] and row["same_as_0_workers"] == "True"
        assert float(row["img_per_s"]) > 0 and float(row["median_s"]) > 0 and int(row["images"]) > 0
