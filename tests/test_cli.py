"""Bad input through the real command line: one clear line, exit code 2, no traceback, no damage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastbyol.cli import main
from fastbyol.engine import checkpoint
from fastbyol.presets import PRESETS

TINY = ["optim.batch_size=4", "data.workers=0", "data.image_size=16", "model.small_stem=true",
        "model.proj_hidden=32", "model.proj_dim=16", "run.progress=off", "optim.warmup_epochs=0"]


def fastbyol(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fastbyol", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastbyol: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def _jpeg_folder(root: Path, n: int) -> Path:
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (i * 20 % 255, 100, 200 - i * 10 % 200)).save(d / f"img{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("args,needle", [
    (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["--preset", "smoke", "optim.batch_size=0"], "optim.batch_size=0"),
    (["--preset", "smoke", "optim.batch_size=-4"], "positive integer"),
    (["--preset", "smoke", "optim.learning_rate=1"], "unknown config key"),
    (["--preset", "byol-r50-100ep", "data.path=/no/such/folder"], "/no/such/folder"),
])
def test_config_and_path_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    assert_one_line_error(fastbyol("train", *args, f"run.out_dir={tmp_path}", cwd=tmp_path), needle)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = fastbyol("train", "--preset", "smoke", "data.source=folder", f"data.path={tmp_path / 'empty'}",
                    f"run.out_dir={tmp_path}", cwd=tmp_path)
    assert_one_line_error(proc, str(tmp_path / "empty"))


def test_corrupt_jpeg_is_skipped_counted_and_listed(tmp_path: Path) -> None:
    data = _jpeg_folder(tmp_path / "data", 11)
    bad = data / "class0" / "broken.jpg"
    good = (data / "class0" / "img0.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # a truncated JPEG
    proc = fastbyol("train", "--preset", "smoke", "data.source=folder", f"data.path={data}", "run.epochs=2",
                    f"run.out_dir={tmp_path}", "run.name=r", "run.log_every=1", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    skipped = (tmp_path / "r" / "skipped.txt").read_text()
    assert "broken.jpg" in skipped
    from fastbyol.telemetry.sinks import read_metrics

    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert rows[-1]["skipped_images"] == 2  # seen once per epoch, two epochs
    assert "2 image(s) could not be decoded and were skipped" in proc.stderr  # the run's last words say so too


def _tiny_run(tmp_path: Path, name: str, *extra: str) -> Path:
    """Train in-process (no second torch import); the CLI is exercised where the message matters."""
    from fastbyol.config_parse import build_config
    from fastbyol.engine.trainer import start_run

    start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={name}", *TINY, *extra])).train()
    return tmp_path / name


def test_truncated_checkpoint_on_resume(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path, "r", "data.num_images=16", "run.epochs=1", "run.ckpt_every=2", "run.keep_last=5")
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 2]
    newest = ckpts[0][1]
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 2])
    assert_one_line_error(fastbyol("train", "--resume", str(newest), cwd=tmp_path), "truncated or damaged")
    # The older checkpoint is untouched and still loads; resuming the run directory falls back to it.
    assert checkpoint.load(ckpts[1][1])["step"] == 2
    from fastbyol.engine.trainer import resume_run

    resumed = resume_run(str(run), [])
    assert resumed.step == 2
    resumed.train()
    assert checkpoint.load(newest)["step"] == 4  # rewritten whole


def test_resume_refuses_changing_the_math(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path, "r", "data.num_images=8", "run.epochs=1")
    assert_one_line_error(fastbyol("train", "--resume", str(run), "optim.base_lr=9", cwd=tmp_path),
                          "cannot change optim.base_lr")
    assert_one_line_error(fastbyol("train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=r",
                                   cwd=tmp_path), "already holds checkpoints")


def test_missing_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(fastbyol("train", "--preset", "smoke", "run.device=cuda", f"run.out_dir={tmp_path}",
                                   cwd=tmp_path), "no CUDA GPU")


def test_help_doctor_presets(tmp_path: Path) -> None:
    proc = fastbyol("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "optim.batch_size" in proc.stdout and "--resume" in proc.stdout
    proc = fastbyol("doctor", cwd=tmp_path)
    assert proc.returncode == 0 and "torch" in proc.stdout and "fastbyol will use" in proc.stdout
    proc = fastbyol("train", "--preset", "byol-r50-40ep", "data.path=/data/train", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0 and "tau_base: 0.97" in proc.stdout and "base_lr: 0.45" in proc.stdout
    proc = fastbyol("presets", cwd=tmp_path)
    assert proc.returncode == 0 and "byol-r50-1000ep" in proc.stdout and "smoke" in proc.stdout
    lines = proc.stdout.splitlines()  # a table: one line per preset, name then what it is
    assert len(lines) == len(PRESETS) and all(line.split()[0] in PRESETS and len(line.split()) > 3 for line in lines)
    proc = fastbyol("presets", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout) == PRESETS


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`fastbyol presets | head -1`: the reader leaves first; the command stops with no traceback (exit 141, a
    shell's SIGPIPE status)."""
    proc = subprocess.Popen([sys.executable, "-m", "fastbyol", "presets"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    assert proc.wait(timeout=300) == 141
    assert proc.stderr.read() == ""


def test_import_official_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.pkl").write_text("hello")
    assert_one_line_error(fastbyol("import", "official", str(tmp_path / "x.pkl"), str(tmp_path / "run"), cwd=tmp_path),
                          "is not a checkpoint of the official BYOL code (not a pickle")
    assert not (tmp_path / "run").exists()
    assert_one_line_error(fastbyol("import", cwd=tmp_path), "usage: fastbyol import official CHECKPOINT.pkl RUN_DIR")


def test_every_readme_command_has_help_and_every_command_is_in_the_readme(capsys: pytest.CaptureFixture[str]
                                                                           ) -> None:
    """Each `fastbyol ...` command the README and the documentation site's pages show names a real subcommand,
    whose --help exits 0 (the CLI's flags and help stay compatible with the documentation), and every subcommand
    appears in them (tests/test_docs.py parses each whole command)."""
    from fastbyol.cli import commands

    paths = {path: parser for path, parser in commands().items() if path}
    root = Path(__file__).resolve().parents[1]
    readme = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs" / "pages").rglob("*.md"))])
    shown = set()
    for match in re.finditer(r"\bfastbyol((?: [a-z][a-z-]*)+)", readme):
        words = tuple(match.group(1).split())
        path = max((words[:n] for n in range(1, len(words) + 1) if words[:n] in paths), key=len, default=None)
        if path is not None:
            shown.add(path)
    leaves = {p for p in paths if not any(q[:len(p)] == p and q != p for q in paths)}
    assert leaves <= shown | {p[:-1] for p in shown}, sorted(leaves - shown)
    for path in sorted(shown):
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert "usage: fastbyol " + " ".join(path) in capsys.readouterr().out
