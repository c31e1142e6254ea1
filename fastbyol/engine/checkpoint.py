"""Checkpoints that survive a kill at any instant.

File layout: 8-byte magic, 64 hex chars of SHA-256 over the payload, then the payload (``torch.save``
of plain containers and tensors, loaded with ``weights_only=True``). Written to a temporary file in the
same directory, fsync'd, renamed over the final name, and the directory fsync'd: a reader sees the old
file or the new one, never a half-written one. ``load`` verifies the checksum, so a truncated or
damaged file is rejected with a message instead of resuming from garbage.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from pathlib import Path
from typing import Any

import torch

from fastbyol.errors import FastByolError
from fastbyol.files import atomic_link, atomic_write_bytes

MAGIC = b"FBYOLCK1"
_HEADER = len(MAGIC) + 64
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
_EPOCH_NAME = re.compile(r"^epoch-(\d+(?:\.\d+)?)\.pt$")


class CheckpointError(FastByolError):
    """A checkpoint could not be written or read; ``reason`` is what is wrong with the file, without the advice."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def _named(ckpt_dir: Path, pattern: re.Pattern[str]) -> list[tuple[str, Path]]:
    """(the number in the name, path) of the files in ``ckpt_dir`` whose name ``pattern`` matches."""
    if not ckpt_dir.is_dir():
        return []
    return [(m.group(1), p) for p in ckpt_dir.iterdir() if (m := pattern.match(p.name))]


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path), newest first."""
    return sorted(((int(n), p) for n, p in _named(ckpt_dir, _NAME)), reverse=True)


def epoch_label(epoch: float) -> str:
    """``10`` for 10.0, ``0.5`` for 0.5: how a kept epoch is written in file names and tables."""
    return str(int(epoch)) if float(epoch).is_integer() else repr(float(epoch))


def epoch_checkpoint_name(epoch: float) -> str:
    return f"epoch-{epoch_label(epoch)}.pt"


def list_epoch_checkpoints(ckpt_dir: Path) -> list[tuple[float, Path]]:
    """(epoch, path) of the checkpoints ``run.keep_epochs`` kept, oldest first."""
    return sorted((float(n), p) for n, p in _named(ckpt_dir, _EPOCH_NAME))


def keep_epoch(path: Path, epoch: float) -> Path:
    """Keep the complete checkpoint ``path`` for good as ``epoch-<epoch>.pt`` beside it (``run.keep_epochs``):
    ``keep_last``'s pruning never touches that name."""
    kept = path.parent / epoch_checkpoint_name(epoch)
    try:
        atomic_link(path, kept)
    except OSError as e:
        raise CheckpointError(f"could not keep {path} as {kept}: {e.strerror or e}; free disk space or fix the run "
                              "directory's permissions, then --resume") from None
    return kept


def save(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then delete all but the newest ``keep_last``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = ckpt_dir / checkpoint_name(step)
    previous = list_checkpoints(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, MAGIC + digest + payload)
    except OSError as e:
        kept = f"the previous checkpoint {previous[0][1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {kept}; "
                              "free disk space or fix the run directory's permissions, then --resume") from None
    for _, old in list_checkpoints(ckpt_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path) -> dict[str, Any]:
    """Read and verify one checkpoint file."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist: pass a checkpoint file or a run "
                              "directory to --resume") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if len(blob) < _HEADER or not blob.startswith(MAGIC):
        reason = f"{path} is not a fastbyol checkpoint (or is truncated to {len(blob)} bytes)"
        raise CheckpointError(f"{reason}: resume from an earlier checkpoint in the same folder", reason)
    payload = blob[_HEADER:]
    if hashlib.sha256(payload).hexdigest().encode() != blob[len(MAGIC):_HEADER]:
        reason = f"checkpoint {path} is truncated or damaged (checksum mismatch)"
        raise CheckpointError(f"{reason}: resume from an earlier checkpoint in the same folder", reason)
    state: dict[str, Any] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return state


def resolve_resume(target: str) -> tuple[Path, dict[str, Any]]:
    """``--resume`` accepts a checkpoint file, or a run directory (its newest valid checkpoint,
    falling back to older ones if the newest is damaged). Returns (run_dir, state)."""
    p = Path(target)
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return run_dir, load(p)
    if p.is_dir():
        ckpt_dir = p / "checkpoints"
        candidates = list_checkpoints(ckpt_dir)
        if not candidates:
            raise CheckpointError(f"no checkpoints in {ckpt_dir}: nothing to resume; start a new run")
        errors: list[str] = []
        for step, path in candidates:
            try:
                state = load(path)
            except CheckpointError as e:
                errors.append(e.reason)
                continue
            if errors:  # the steps after this one are lost: say so, once, before training them again
                print(f"fastbyol: warning: {len(errors)} newer checkpoint(s) damaged ({errors[0]}): resuming from "
                      f"{path.name} (step {step}); the steps after it are trained again", file=sys.stderr, flush=True)
            return p, state
        raise CheckpointError(f"every checkpoint in {ckpt_dir} is damaged ({len(errors)} files; newest: {errors[0]}): "
                              "nothing to resume from; restore the run directory from a copy, or start a new run")
    raise CheckpointError(f"--resume {target}: no such checkpoint file or run directory")
