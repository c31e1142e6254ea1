"""The shared benchmark harness (STYLE.md habit 10: benchmarks report like a paper).

Every script warms up, times with device-synchronised events, reports median and spread, compares bytes/s
against the measured copy bandwidth of the same device, and writes the environment (device, driver, torch,
triton, commit, date) into every row, so a CSV row read alone still says where it came from.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from fastbyol.kernels.launch import interpreted

from fastbyol.telemetry.results import (  # noqa: F401  (re-exported for the scripts)
    device_name,
    environment,
    markdown_table,
    quantile,
    time_calls,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


def triton_runs_here(device: torch.device) -> bool:
    """Triton needs a GPU, or its interpreter on the CPU (TRITON_INTERPRET=1, set before import)."""
    return device.type == "cuda" or interpreted()


@dataclass
class Timing:
    """Per-call wall time of one benchmarked function, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    iters: int


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50) -> Timing:
    """Warm up, then time ``iters`` calls of ``fn`` one by one (``fastbyol.telemetry.results.time_calls``:
    CUDA events around each call, one sync at the end; ``perf_counter`` on the CPU)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):  # compilation, autotuning, allocator caching, clocks ramping up
        fn()
    times_ms, _ = time_calls(fn, device, iters)
    times_ms.sort()
    return Timing(median_ms=statistics.median(times_ms), p10_ms=quantile(times_ms, 0.1),
                  p90_ms=quantile(times_ms, 0.9), min_ms=times_ms[0], iters=iters)


def assert_close_at(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, where: str) -> None:
    """torch.testing.assert_close, its message prefixed with which case failed (the benchmarks' correctness
    check before timing)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")


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


SYNTHETIC_CLASSES = 10


def add_image_folder_args(parser: argparse.ArgumentParser, images: tuple[int, int], side: tuple[int, int]) -> None:
    """--folder, or --images synthetic JPEGs of --source-size px (defaults given as (full, quick)); read back
    with ``image_folder``."""
    parser.add_argument("--folder", type=Path, default=None, help="image folder (default: synthetic JPEGs)")
    parser.add_argument("--images", type=int, default=None,
                        help=f"synthetic images (default {images[0]}; quick {images[1]})")
    parser.add_argument("--source-size", type=int, default=None,
                        help=f"synthetic image side (default {side[0]}; quick {side[1]})")
    parser.set_defaults(image_defaults=(images, side))


def image_folder(args: argparse.Namespace, tmp: str) -> Path:
    """``args.folder``, or a folder of ``args.images`` synthetic JPEGs (``fastbyol data make synthetic``, 10
    classes) written under ``tmp``; fills in args.images and args.source_size from the (full, quick) defaults."""
    from fastbyol.data.builders import make_synthetic

    (images, side), pick = args.image_defaults, 1 if args.quick else 0
    args.images, args.source_size = args.images or images[pick], args.source_size or side[pick]
    if args.folder is not None:
        return Path(args.folder)
    make_synthetic(str(Path(tmp) / "images"), num_classes=SYNTHETIC_CLASSES,
                   train_per_class=args.images // SYNTHETIC_CLASSES, val_per_class=0, size=args.source_size)
    return Path(tmp) / "images" / "train"
