"""Guardrails a newcomer trips on (issue 29), through the real CLI: each bad input is one line with the fix and
exit code 2; each silent stop says how to go on."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import assert_one_line_error, fastbyol

from fastbyol import __version__
from fastbyol.cli import COMMANDS, _parser


def test_version(tmp_path: Path) -> None:
    proc = fastbyol("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastbyol {__version__}"


@pytest.mark.parametrize(("typed", "suggested"), [("trian", "train"), ("evl", "eval"), ("preset", "presets")])
def test_mistyped_command_suggests_the_nearest(tmp_path: Path, typed: str, suggested: str) -> None:
    assert_one_line_error(fastbyol(typed, cwd=tmp_path), f"did you mean {suggested}?")


def test_command_list_matches_the_parser() -> None:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    assert tuple(sub.choices) == COMMANDS  # type: ignore[attr-defined]


@pytest.mark.parametrize(("args", "needle"), [(["knn", "--k", "0"], "--k 0"), (["knn", "--k", "20", "-3"], "--k 20 -3"),
                                              (["linear", "--epochs", "0"], "--epochs 0")])
def test_eval_arguments_are_checked_before_any_work(tmp_path: Path, args: list[str], needle: str) -> None:
    # No checkpoint, no data: the argument is refused first, in one line.
    proc = fastbyol("eval", args[0], str(tmp_path / "no-run"), "--data", str(tmp_path / "no-data"), *args[1:],
                    cwd=tmp_path)
    assert_one_line_error(proc, needle)


def test_max_steps_stop_says_how_to_continue(tmp_path: Path) -> None:
    proc = fastbyol("train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=r", "data.num_images=32",
                    "optim.batch_size=8", "data.image_size=16", "model.small_stem=true", "model.proj_hidden=32",
                    "model.proj_dim=16", "data.workers=0", "run.progress=off", "run.telemetry=off", "run.max_steps=2",
                    "run.kernels=off", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    hint = [line for line in proc.stderr.splitlines() if "run.max_steps=2" in line]
    assert hint and f"--resume {tmp_path / 'r'} run.max_steps=0" in hint[0]


def test_knn_k_larger_than_the_training_split_is_refused(tmp_path: Path) -> None:
    import torch

    from fastbyol.data.builders import make_synthetic
    from fastbyol.engine.evaluate import evaluate_encoder
    from fastbyol.errors import FastByolError
    from fastbyol.eval.baselines import RawPixels

    make_synthetic(str(tmp_path / "d"), num_classes=2, train_per_class=3, val_per_class=1, size=16)
    with pytest.raises(FastByolError, match="1 <= k <= the 6 training images"):
        evaluate_encoder(RawPixels(), str(tmp_path / "d"), 16, torch.device("cpu"), knn_k=(7,), linear_epochs=None)
    assert evaluate_encoder(RawPixels(), str(tmp_path / "d"), 16, torch.device("cpu"), knn_k=(6,),
                            linear_epochs=None)["knn6"]["top1"] >= 0


def test_link_loops_in_the_data_folder_are_skipped_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from fastbyol.data.builders import make_synthetic

    make_synthetic(str(tmp_path / "d"), num_classes=2, train_per_class=3, val_per_class=1, size=16)
    train = tmp_path / "d" / "train"
    a = sorted(p for p in train.iterdir() if p.is_dir())[0]
    os.symlink("../" + a.name, a / "self")  # the two loops: each would make the walk grow exponentially
    os.symlink("..", a / "up")
    # A subprocess with a deadline: a walk that follows the loops never ends.
    code = ("from fastbyol.data.folder import scan_image_folder; "
            f"p, l, c = scan_image_folder({str(train)!r}); print(len(p), len(c))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["6", "2"]  # every image once, two classes
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "2 folder link(s)" in warnings[0] and str(a / "self") in warnings[0]
    proc = fastbyol("data", "check", str(train), cwd=tmp_path)
    assert proc.returncode == 0 and "2 folder link(s)" in proc.stderr, proc.stderr


def test_a_dataset_root_is_not_read_as_classes(tmp_path: Path) -> None:
    from fastbyol.data.builders import make_synthetic

    make_synthetic(str(tmp_path / "d"), num_classes=2, train_per_class=2, val_per_class=1, size=16)
    root = tmp_path / "d"
    assert_one_line_error(fastbyol("train", "--preset", "smoke", "data.source=folder", f"data.path={root}",
                                   f"run.out_dir={tmp_path}", cwd=tmp_path), f"data.path={root / 'train'}")
    assert not list(tmp_path.glob("smoke*"))  # no run directory left behind
    assert_one_line_error(fastbyol("data", "check", str(root), cwd=tmp_path), "holds train/ and val/ splits")


def test_every_config_error_is_reported_at_once(tmp_path: Path) -> None:
    from fastbyol.config_checks import ConfigError
    from fastbyol.config_parse import build_config

    # Two bad overrides: both named.
    with pytest.raises(ConfigError) as e:
        build_config("smoke", overrides=["optim.batch_sise=8", "run.log_every=x"])
    assert "2 config errors" in str(e.value) and "batch_sise" in str(e.value) and "run.log_every" in str(e.value)
    # Valid keys with bad values in three sections: each section's error named, in one line.
    with pytest.raises(ConfigError) as e:
        build_config("smoke", overrides=["optim.batch_size=0", "run.log_every=0", "data.image_size=8"])
    message = str(e.value)
    assert "3 config errors" in message and "\n" not in message
    assert all(key in message for key in ("optim.batch_size", "run.log_every", "data.image_size"))
    assert_one_line_error(fastbyol("train", "--preset", "smoke", "optim.batch_size=0", "run.log_every=0",
                                   cwd=tmp_path), "2 config errors")


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no-images"])
def test_a_bad_data_path_fails_before_torch_is_imported(tmp_path: Path, kind: str) -> None:
    import subprocess
    import sys

    target = tmp_path / "data"
    if kind == "file":
        target.write_text("not a folder")
    elif kind in ("empty", "no-images"):
        (target / "a").mkdir(parents=True)
        if kind == "no-images":
            (target / "a" / "notes.txt").write_text("x")
    code = ("import sys; from fastbyol.cli import main; "
            f"rc = main(['train', '--preset', 'smoke', 'data.source=folder', 'data.path={target}', "
            f"'run.out_dir={tmp_path / 'runs'}']); print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr  # exit 2, and torch never started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastbyol: error:")]
    assert len(errors) == 1 and str(target) in errors[0] and "data.path" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_too_little_disk_for_the_checkpoints_fails_before_training(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from fastbyol.config_parse import build_config
    from fastbyol.engine import preflight
    from fastbyol.errors import FastByolError

    cfg = build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.keep_last=2"])
    size = preflight.checkpoint_bytes(cfg)
    assert size is not None and 130e6 < size < 150e6  # ResNet-18 + the smoke heads: online, momentum, target
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 40, 0, 2 << 20))  # a 2 MB file system
    with pytest.raises(FastByolError, match=r"has 2.0 MiB free, but the run keeps up to 3 checkpoints"):
        preflight.preflight(cfg)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 40, 0, 3 * size + (1 << 30)))
    preflight.preflight(cfg)  # exactly enough


def test_checkpoint_size_estimate_matches_a_real_checkpoint(tmp_path: Path) -> None:
    from fastbyol.config_parse import build_config
    from fastbyol.engine import checkpoint, preflight
    from fastbyol.engine.trainer import start_run

    cfg = build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=r", "data.num_images=8",
                                           "optim.batch_size=8", "data.image_size=16", "data.workers=0",
                                           "run.progress=off", "run.telemetry=off", "run.kernels=off"])
    start_run(cfg).train()
    (_, path), = checkpoint.list_checkpoints(tmp_path / "r" / "checkpoints")
    estimate = preflight.checkpoint_bytes(cfg)
    assert estimate is not None and abs(path.stat().st_size - estimate) < 0.01 * estimate


def _run_logged(args: list[str], log: Path, cwd: Path) -> tuple[int, list[tuple[float, str]]]:
    """Run ``fastbyol ARGS`` with stdout and stderr to ``log`` (not a terminal), progress every second, and return
    its exit code and each line with the time (s since start) it appeared in the file."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "FASTBYOL_PROGRESS_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "fastbyol", *args], stdout=f, stderr=f, cwd=cwd, env=env)
        done = False
        while not done:
            done = proc.poll() is not None
            lines = log.read_text().splitlines()
            complete = lines if done else lines[:-1]  # the last may be half-written
            seen += [(time.monotonic() - t0, line) for line in complete[len(seen):]]
            time.sleep(0.1)
    return proc.returncode, seen


def _gaps(lines: list[tuple[float, str]]) -> list[float]:
    return [b[0] - a[0] for a, b in zip(lines, lines[1:])]


def test_long_commands_write_a_line_every_interval_to_a_log_file(tmp_path: Path) -> None:
    from fastbyol.config_parse import build_config
    from fastbyol.data.builders import make_synthetic
    from fastbyol.engine.trainer import start_run

    start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=r", "data.num_images=8",
                                               "optim.batch_size=8", "data.image_size=16", "data.workers=0",
                                               "run.progress=off", "run.telemetry=off", "run.kernels=off"])).train()
    make_synthetic(str(tmp_path / "d"), num_classes=2, train_per_class=8, val_per_class=2, size=16)
    rc, lines = _run_logged(["eval", "finetune", str(tmp_path / "r"), "--data", str(tmp_path / "d"),
                             "--labels-fraction", "1", "--epochs", "25", "--batch-size", "4", "--lr", "0.1",
                             "--linear-epochs", "1"], tmp_path / "finetune.log", tmp_path)
    assert rc == 0, lines
    progress = [(t, line) for t, line in lines if line.startswith("fastbyol: fine-tune at lr 0.1: [")]
    # 100 steps: a line at least every second while it runs (slack for one slow step), and one at the end.
    assert len(progress) >= 2 and progress[-1][1].split("] ")[1].startswith("100/100"), lines
    assert max(_gaps(progress)) < 5.0, progress
    assert not [line for _, line in lines if "Warning" in line], lines  # no third-party warning in the log
    rc, lines = _run_logged(["bench", "--quick", "--batch", "4", "--steps", "40", "--rounds", "1", "--warmup", "1",
                             "--telemetry", "off", "--out", str(tmp_path / "bench"), "data.image_size=16",
                             "data.workers=0"], tmp_path / "bench.log", tmp_path)
    assert rc == 0, lines
    bench = [(t, line) for t, line in lines if line.startswith("fastbyol bench: ")]
    assert bench and bench[-1][1].split("] ")[1].startswith("41/41"), lines
    assert not bench[1:] or max(_gaps(bench)) < 5.0, bench


def test_eval_results_name_the_checkpoint_and_go_to_the_report(tmp_path: Path) -> None:
    import json

    from fastbyol.config_parse import build_config
    from fastbyol.data.builders import make_synthetic
    from fastbyol.engine.trainer import start_run
    from fastbyol.telemetry.report import build_report

    start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=r", "data.num_images=16",
                                               "optim.batch_size=8", "data.image_size=16", "data.workers=0",
                                               "run.progress=off", "run.telemetry=off", "run.kernels=off",
                                               "run.log_every=1"])).train()
    make_synthetic(str(tmp_path / "d"), num_classes=2, train_per_class=4, val_per_class=2, size=16)
    run = tmp_path / "r"
    proc = fastbyol("eval", "knn", str(run), "--data", str(tmp_path / "d"), "--k", "3", "--json",
                    str(tmp_path / "knn.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["step"] == 2 and result["epoch"] == 1.0 and result["checkpoint_file"].endswith("ckpt-00000002.pt")
    kept = json.loads((run / "eval" / "knn-step2.json").read_text())
    assert kept["knn3"] == result["knn3"] and kept["protocol"] == "knn" and kept["date"]
    page = build_report(run).read_text(encoding="utf-8")
    assert '<table id="eval-results">' in page and f"kNN-3 {result['knn3']['top1']:.4g}"[:9] in page


def test_a_busy_cpu_gets_a_thread_hint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    import torch

    from fastbyol.cli import _busy_cpu_hint

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    _busy_cpu_hint()
    assert "OMP_NUM_THREADS=1" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    _busy_cpu_hint()
    assert capsys.readouterr().err == ""


def test_an_all_unreadable_folder_is_one_line_not_a_worker_traceback(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "d" / cls / f"{i}.jpg").write_text("not an image")
    proc = fastbyol("train", "--preset", "smoke", "data.source=folder", f"data.path={tmp_path / 'd'}",
                    f"run.out_dir={tmp_path / 'runs'}", "optim.batch_size=4", "data.image_size=16", "data.workers=1",
                    "run.telemetry=off", cwd=tmp_path)
    assert_one_line_error(proc, "unreadable images in a row")
    assert "fastbyol data check --full" in proc.stderr and "Original Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").iterdir())  # nothing to resume: no run directory left behind

