"""The shared benchmark harness (STYLE.md habit 10: benchmarks report like a paper).

Every script warms up, times with device-synchronised events, reports median and spread, compares bytes/s
against the measured copy bandwidth of the same device, and writes the environment (device, driver, torch,
triton, commit, date) into every row, so a CSV row read alone still says where it came from.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastbyol.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


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


def triton_runs_here(device: torch.device) -> bool:
    """Triton needs a GPU, or its interpreter on the CPU (TRITON_INTERPRET=1, set before import)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Timing:
    """Per-call wall time of one benchmarked function, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    iters: int


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50) -> Timing:
    """Warm up, then time ``iters`` calls of ``fn`` one by one.

    CUDA launches are asynchronous: host clocks would time the launch, not the kernel. A pair of CUDA events
    recorded on the stream around each call brackets the device work itself, and one synchronise at the end
    (not one per call) keeps the host from stalling the queue between calls. On the CPU the work is
    synchronous, so ``time.perf_counter`` around each call is the device time.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):  # compilation, autotuning, allocator caching, clocks ramping up
        fn()
    times_ms: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)  # the one host sync: every event has completed after it
        times_ms = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    times_ms.sort()
    return Timing(median_ms=statistics.median(times_ms), p10_ms=_quantile(times_ms, 0.1),
                  p90_ms=_quantile(times_ms, 0.9), min_ms=times_ms[0], iters=iters)


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None, warmup: int = 10, iters: int = 50) -> float:
    """Measured device-memory copy bandwidth in GB/s (1e9 B/s): the ceiling for bandwidth-bound kernels.

    ``dst.copy_(src)`` reads and writes every byte, so it moves 2 * nbytes. The buffer (1 GiB on CUDA) is far
    larger than the L2 cache (50 MiB on an H100), so this is DRAM/HBM bandwidth, not cache bandwidth.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    n = nbytes // 4
    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=warmup, iters=iters)
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark shares; ``extra`` may add a script's own. ``args.device`` is a torch.device."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when one is visible)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few iterations: a smoke run (CPU tests, TRITON_INTERPRET=1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default 10; quick 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case (default 50; quick 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the CSV and markdown results")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog}: --device {args.device} asked but no CUDA GPU is visible: use --device cpu")
    args.device = device
    if args.warmup is None:
        args.warmup = 1 if args.quick else 10
    if args.iters is None:
        args.iters = 3 if args.quick else 50
    return args


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
