"""Where a benchmark row came from, and how result tables are written (STYLE.md habit 10).

Every row carries the environment (device, driver, CUDA, torch, triton, commit, date), so a CSV row read
alone still says where it came from. Used by ``fastbyol bench`` and the scripts under ``benchmarks/``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastbyol.files import atomic_write_text


def quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def time_calls(fn: Callable[[], object], device: torch.device, n: int) -> tuple[list[float], float]:
    """(per-call ms, wall seconds of the block) of ``n`` calls of ``fn``, one by one.

    CUDA launches are asynchronous: host clocks would time the launch, not the work. A pair of CUDA events
    recorded on the stream around each call brackets the device work itself, and one synchronise at the end
    (not one per call) keeps the host from stalling the queue between calls. On the CPU the work is
    synchronous, so ``time.perf_counter`` around each call is the device time."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if cuda:
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)  # the one host sync: every event has completed after it
        return [start.elapsed_time(end) for start, end in pairs], time.perf_counter() - t0
    times_ms = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - s) * 1e3)
    return times_ms, time.perf_counter() - t0


# The checkout fastbyol runs from (an editable install); the commit is "unknown" for a wheel install.
REPO_ROOT = Path(__file__).resolve().parents[2]


def _git_commit() -> str:
    """Short commit, "-dirty" when the work tree has changes: a number from uncommitted code says so."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain") else "")
    except Exception:  # no git, not a repository, a timeout: the row still gets written
        return "unknown"


def _driver_version() -> str | None:
    """NVIDIA driver via NVML; None where pynvml is absent or there is no driver (optional dependency)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's kind and core count (no hostname)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and software facts merged into every result row."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:
        triton_version = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "device": device_name(device),
        "driver": _driver_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def _slug(text: str) -> str:
    """File-name-safe lower-case form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The rows without the environment columns, under one line that names the environment."""
    header = "Environment: " + ", ".join(f"{k} {_fmt(v) or '-'}" for k, v in env.items())
    cols = [k for k in rows[0] if k not in env] if rows else []
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Write ``<date>-<device>-<name>.csv`` and ``.md`` under ``out_dir``, env merged into every row;
    print the markdown table; return the CSV path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = [{**row, **env} for row in rows]
    date = str(env.get("date", _dt.datetime.now(_dt.timezone.utc).isoformat()))[:10]
    stem = f"{date}-{_slug(str(env.get('device', 'unknown')))}-{name}"
    fields: list[str] = []
    for row in merged:
        fields += [k for k in row if k not in fields]

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    # Full precision in the CSV (repr of floats); the markdown rounds to 4 significant digits.
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in merged)
    csv_path = out_dir / f"{stem}.csv"
    atomic_write_text(csv_path, buffer.getvalue())
    table = markdown_table(rows, env)
    atomic_write_text(out_dir / f"{stem}.md", table)
    sys.stdout.write(table)
    sys.stdout.flush()
    return csv_path
