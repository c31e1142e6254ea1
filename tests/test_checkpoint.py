"""Checkpoint files: atomic, checksummed, verified on load; damaged ones rejected with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastbyol import files
from fastbyol.engine import checkpoint
from fastbyol.engine.checkpoint import CheckpointError


def _state(v: float) -> dict[str, object]:
    return {"step": int(v), "w": torch.full((3, 4), v), "nested": {"m": torch.arange(5), "s": "x"}}


def test_roundtrip_and_keep_last(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        checkpoint.save(_state(step), d, step, keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(d)] == [4, 3]
    state = checkpoint.load(d / "ckpt-00000004.pt")
    assert torch.equal(state["w"], torch.full((3, 4), 4.0)) and state["nested"]["s"] == "x"
    assert not list(d.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_checkpoint_is_rejected_and_auto_falls_back(tmp_path: Path, damage: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "run" / "checkpoints"
    checkpoint.save(_state(1), d, 1, keep_last=3)
    newest = checkpoint.save(_state(2), d, 2, keep_last=3)
    blob = newest.read_bytes()
    newest.write_bytes({"truncate": blob[: len(blob) // 2], "flip": blob[:-10] + b"x" * 10, "empty": b"",
                        "garbage": b"not a checkpoint at all" * 10}[damage])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(newest)
    assert str(newest) in str(e.value) and "\n" not in str(e.value)
    run_dir, state = checkpoint.resolve_resume(str(tmp_path / "run"))
    assert run_dir == tmp_path / "run" and state["step"] == 1
    # The fallback is said, once: which file was damaged and which step the run goes back to.
    warning = capsys.readouterr().err
    assert warning.count("warning:") == 1 and str(newest) in warning and "ckpt-00000001.pt (step 1)" in warning
    # Every file damaged: one line that says so without advising an earlier checkpoint that does not exist.
    first = d / checkpoint.checkpoint_name(1)
    first.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve_resume(str(tmp_path / "run"))
    message = str(e.value)
    assert "every checkpoint" in message and "2 files" in message and "earlier checkpoint" not in message
    assert "start a new run" in message and "\n" not in message


def test_failed_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "checkpoints"
    first = checkpoint.save(_state(1), d, 1, keep_last=3)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint .* is intact"):
        checkpoint.save(_state(2), d, 2, keep_last=3)
    monkeypatch.undo()
    assert [p for _, p in checkpoint.list_checkpoints(d)] == [first]
    assert not list(d.glob(".*tmp"))
    assert checkpoint.load(first)["step"] == 1


def test_resume_targets(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file or run directory"):
        checkpoint.resolve_resume(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        checkpoint.resolve_resume(str(tmp_path / "empty"))
