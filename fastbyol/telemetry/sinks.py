"""Where metrics rows go: ``metrics.jsonl`` (one JSON object per log step) and the console."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any


class JsonlMetrics:
    """Appends one row per log step, flushed, so a killed run loses no logged row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """One console line: steps done, img/s, ETA, last logged loss. Redrawn in place on a terminal,
    printed at the log cadence otherwise (CI logs)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, stream: IO[str] | None = None,
                 width: int = 24) -> None:
        self.total, self.start = total_steps, start_step
        self.stream = stream or sys.stderr
        self.enabled, self.width = enabled, width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0

    def update(self, step: int, images_per_step: int, loss: float | None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and (not self.tty or now - self._last_draw < 0.2):
            return
        self._last_draw = now
        done = step - self.start
        elapsed = now - self.t0
        img_per_s = done * images_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else float("nan")
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        loss_text = f" loss {loss:.4f}" if loss is not None else ""
        line = (f"[{bar}] {step}/{self.total} {100 * step / max(self.total, 1):5.1f}% "
                f"{img_per_s:8.1f} img/s ETA {format_duration(eta)}{loss_text}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
