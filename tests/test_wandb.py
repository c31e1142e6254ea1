"""Weights & Biases tracking (``run.wandb=PROJECT``), offline: the rows, config and report that reach the W&B run
files, one W&B run across a resume, and the one-line failures (no package, no login, a logging error mid-run).

wandb 0.30 has no Python reader for its ``.wandb`` files (its core is Go), so ``read_wandb`` below decodes them: a
7-byte header (``:W&B``, a 2-byte magic, a version byte), then LevelDB log-format records in 32 KiB blocks (each
record: CRC32C (4 bytes), length (2, little-endian), type (1: FULL=1, FIRST=2, MIDDLE=3, LAST=4); a block's
last < 7 bytes are zero padding), each payload a ``wandb_internal_pb2.Record``."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastbyol.cli import main
from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.telemetry.sinks import read_metrics, scalars

wandb = pytest.importorskip("wandb")

# test_telemetry.py's tiny smoke run with the ImageNet stem (16 px -> 4 px maps: 16x fewer FLOPs) and torchvision's
# init (Haiku's truncated normal takes seconds on a shared 2-core CPU), 8 steps of 8
# images; sessions stop at run.max_steps, short of the run's end (which draws and uploads the report), but in
# the first test, whose whole run is 4 steps.
TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=false", "model.init=torchvision", "data.image_size=16", "data.workers=0", "run.progress=off",
        "optim.warmup_epochs=0.25", "run.epochs=1", "run.log_every=1", "run.telemetry=off"]
_BLOCK, _HEADER = 32 * 1024, 7


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline, quiet, no git or code capture, wandb's own settings in tmp_path: no network, nothing in $HOME.
    wandb reads the environment once per process (``wandb.setup``); ``teardown`` makes the next run read it again."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()
    yield
    wandb.teardown()


def read_wandb(path: Path) -> list[Any]:
    """The protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    payloads, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the block's zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # a preallocated, unwritten tail
            break
        chunk, pos = data[pos + _HEADER:pos + _HEADER + length], pos + _HEADER + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            assert kind == 4, f"record type {kind} at byte {pos}"
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history(records: list[Any]) -> list[dict[str, Any]]:
    """Each history record as {key: value} (nested keys joined by '.', so an image is report/loss._type)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item})
    return rows


def wandb_files(run_dir: Path) -> list[Path]:
    """The run directory's .wandb files, oldest first, once complete: ``run.finish`` returns before wandb's core
    process has written the last records; stopping that process (``teardown``) waits for it."""
    wandb.teardown()
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def _train(tmp_path: Path, name: str, *extra: str) -> int:
    return main(["train", "--preset", "smoke", f"run.out_dir={tmp_path}", f"run.name={name}", *TINY, *extra])


def test_offline_run_holds_every_row_the_config_and_the_report(tmp_path: Path) -> None:
    assert _train(tmp_path, "w", "run.wandb=byol-test", "run.wandb_tags=cpu,tiny", "run.telemetry=on",
                  "run.epochs=0.5") == 0
    run_dir = tmp_path / "w"
    (path,) = wandb_files(run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert path.name == f"run-{run_id}.wandb"
    records = read_wandb(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (run_id, "byol-test", "w", ["cpu", "tiny"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run"]["wandb"] == "byol-test" and config["optim"]["batch_size"] == 8
    assert config["model"]["arch"] == "resnet18" and config["preset"] == "smoke"

    rows, logged = read_metrics(run_dir / "metrics.jsonl"), history(records)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [h["_step"] for h in logged] == [1, 2, 3, 4]
    for row, h in zip(rows, logged):
        assert {k: h[k] for k in scalars(row)} == pytest.approx(scalars(row))  # phase_ms/forward, lr, tau, ...
        assert h["loss"] == row["loss"]
    assert "phase_ms/forward" in logged[0]
    # The run reached its last step: the report's plots (and page) joined the last row.
    assert logged[-1]["report/loss._type"] == "image-file" and logged[-1]["report/page._type"] == "html-file"
    assert (run_dir / "report" / "loss.png").is_file()
    assert not any("report/loss._type" in h for h in logged[:-1])


def test_resumed_run_continues_the_same_wandb_run_without_repeating_steps(tmp_path: Path) -> None:
    """Three sessions: steps 1-2 without W&B; a resume that turns run.wandb on (a new W&B run, sent rows 1-2
    first) and is killed after logging step 3 with its last checkpoint at step 2 (here: resumed from ckpt-2
    after a session that went on to step 3); that resume computes step 3 again, and W&B keeps the first one (the
    same loss: a resume is bitwise), so the two W&B sessions' files, of one run id, hold each step once."""
    assert _train(tmp_path, "r", "run.max_steps=2", "run.ckpt_every=2") == 0
    run_dir = tmp_path / "r"
    assert not (run_dir / "wandb").exists()
    assert main(["train", "--resume", str(run_dir), "run.max_steps=3", "run.wandb=byol-test"]) == 0
    run_id = (run_dir / "wandb_id.txt").read_text()
    assert main(["train", "--resume", str(run_dir / "checkpoints" / "ckpt-00000002.pt"),
                 "run.max_steps=4", "run.wandb=byol-test", "run.wandb_tags=resumed"]) == 0  # ckpt-2 predates W&B
    assert (run_dir / "wandb_id.txt").read_text() == run_id
    first, second = wandb_files(run_dir)
    assert first.name == second.name == f"run-{run_id.strip()}.wandb" and first.parent != second.parent
    steps = [[h["_step"] for h in history(read_wandb(p))] for p in (first, second)]
    assert steps == [[1, 2, 3], [4]]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    logged = history(read_wandb(first)) + history(read_wandb(second))
    assert [h["loss"] for h in logged] == [r["loss"] for r in rows]
    (run,) = [r.run for r in read_wandb(second) if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id.strip() and list(run.tags) == ["resumed"]


def test_missing_wandb_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert _train(tmp_path, "m", "run.wandb=byol-test") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fastbyol: error: run.wandb=byol-test needs the wandb package: pip install wandb (or fastbyol[track]), "
        "or drop run.wandb"]
    assert not (tmp_path / "m").exists()  # nothing left behind


def test_wandb_that_cannot_start_is_one_line_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Online with no API key (HOME and wandb's config folder are empty; wandb refuses before any network)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    wandb.teardown()  # read WANDB_MODE again
    assert _train(tmp_path, "o", "run.wandb=byol-test") == 2
    run_line, error = capsys.readouterr().err.strip().splitlines()  # the CLI's "fastbyol: run ...", then the error
    assert run_line.startswith("fastbyol: run ")
    assert error.startswith("fastbyol: error: run.wandb=byol-test: W&B could not start the run (")
    assert error.endswith("run `wandb login`, or set WANDB_MODE=offline (then `wandb sync`), or drop run.wandb")
    # Stopped before its first step: the run directory, which holds nothing to resume, is not left behind, so the
    # same command can run again.
    assert not (tmp_path / "o").exists()


def test_logging_error_mid_run_turns_wandb_off_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from wandb.sdk.wandb_run import Run

    real_log = Run.log

    def log(self: Any, data: dict[str, Any], step: int | None = None, **kw: Any) -> None:
        if step == 2:
            raise OSError(28, "No space left on device")
        real_log(self, data, step=step, **kw)

    monkeypatch.setattr(Run, "log", log)
    assert _train(tmp_path, "e", "run.wandb=byol-test", "run.max_steps=3") == 0
    err = capsys.readouterr().err
    assert err.count("W&B") == 1
    assert "fastbyol: W&B logging off from step 2: [Errno 28] No space left on device (metrics.jsonl keeps every row)" \
        in err
    assert [r["step"] for r in read_metrics(tmp_path / "e" / "metrics.jsonl")] == [1, 2, 3]
    (path,) = wandb_files(tmp_path / "e")
    assert [h["_step"] for h in history(read_wandb(path))] == [1]


def test_wandb_settings_are_validated() -> None:
    cfg = build_config("smoke", overrides=["run.wandb=p", "run.wandb_tags=a, b,,c"])
    assert cfg.run.wandb_tags == ["a", "b", "c"]
    assert build_config("smoke", overrides=['run.wandb_tags=["x,y", z]']).run.wandb_tags == ["x,y", "z"]
    assert build_config("smoke").run.wandb_tags == []
    for bad, message in [("run.wandb=team/project", "run.wandb='team/project' contains /, which W&B refuses: use "
                                                    "a plain name, e.g. run.wandb=byol-r50"),
                         ("run.wandb_entity=a:b", "run.wandb_entity='a:b' contains :"),
                         (f"run.wandb_tags={'t' * 65}", "W&B takes tags of 1 to 64 characters"),
                         ("run.wandb_tags=[a", "is not a YAML list: write run.wandb_tags=a,b")]:
        with pytest.raises(ConfigError, match=None) as e:
            build_config("smoke", overrides=[bad])
        assert message in str(e.value) and "\n" not in str(e.value)
