"""Where metrics rows go: ``metrics.jsonl`` (one JSON object per log step) and the console."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from fastbyol.errors import FastByolError


class JsonlMetrics:
    """Appends one row per log step, flushed, so a killed run loses no logged row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._file.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run re-logs them). Rewritten atomically."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a half-written last line from a killed run: everything after it is gone too
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def require_tensorboard() -> None:
    """Fail before the run starts, not at its first row, when the optional package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise FastByolError("run.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                            "or set run.tensorboard=false") from None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as TensorBoard tags: numbers at the top level, ``phase_ms/forward``,
    ``gpu0/power_w``; lists of names (clock-event reasons) and non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "gpus" and isinstance(value, list):
            for gpu in value:
                for field, v in gpu.items():
                    if field != "gpu" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[f"gpu{gpu.get('gpu', 0)}/{field}"] = float(v)
        elif isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[key] = float(value)
    return out


class TensorBoardSink:
    """Every metrics row as TensorBoard scalars at its step (``tensorboard --logdir RUN_DIR/tensorboard``).

    A run resumed from step S appends to the same folder, which may already hold rows past S (logged after
    that checkpoint, before the run was killed): ``purge_step`` S + 1 makes TensorBoard drop those, so every
    step shows once, with the resumed run's value."""

    def __init__(self, log_dir: Path, resumed_at: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


PLAIN_EVERY_S = 30.0
"""Off a terminal (a log file under sbatch, nohup, CI), a progress line at least this often, so a log shows the
work is alive; ``FASTBYOL_PROGRESS_SECONDS`` sets another interval (the tests use 1)."""


def plain_every_s() -> float:
    try:
        return float(os.environ.get("FASTBYOL_PROGRESS_SECONDS", PLAIN_EVERY_S))
    except ValueError:
        return PLAIN_EVERY_S


class ProgressBar:
    """One console line: what (``label``), steps done, images/s, ETA, last loss. Redrawn in place on a terminal;
    off one (CI logs, sbatch), a plain line when ``force``d (training's log cadence, the end of a phase) and at
    least every ``plain_every_s()`` seconds: the one progress convention of every long command."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, stream: IO[str] | None = None,
                 width: int = 24, label: str = "", unit: str = "img") -> None:
        self.total, self.start = total_steps, start_step
        self.stream = stream or sys.stderr
        self.enabled, self.width = enabled, width
        self.label, self.unit = label, unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_line = self.t0
        self.every_s = plain_every_s()

    def update(self, step: int, images_per_step: int, loss: float | None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force:
            if self.tty and now - self._last_draw < 0.2:
                return
            if not self.tty and now - self._last_line < self.every_s:
                return
        self._last_draw = self._last_line = now
        done = step - self.start
        elapsed = now - self.t0
        img_per_s = done * images_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else float("nan")
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        loss_text = f" loss {loss:.4f}" if loss is not None else ""
        label = f"{self.label}: " if self.label else ""
        line = (f"{label}[{bar}] {step}/{self.total} {100 * step / max(self.total, 1):5.1f}% "
                f"{img_per_s:8.1f} {self.unit}/s ETA {format_duration(eta)}{loss_text}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
