"""``fastbyol bench``: the real training step, timed over a sweep of settings.

Each case builds a ``Trainer`` exactly as ``fastbyol train`` does and calls the same ``Trainer.train_step``
(fetch, forward/backward, LARS, EMA). The data are either one synthetic batch made on the device and
reused (``synthetic``: the step's own throughput, no input pipeline) or a real image folder read by the
torchvision or DALI pipeline (``torch`` / ``dali``; a procedurally drawn JPEG folder is made when no
``--data-path`` is given). After warm-up (compilation, autotuning, allocator caching, clocks ramping up),
every timed step is bracketed by CUDA events (no host sync between steps; one at the end) or, on the CPU,
by ``time.perf_counter``.

Telemetry (phase events + the NVML sampler) is switched on and off *inside one trainer*, in alternating
blocks of steps, so its overhead is measured on the same memory layout and clocks, not across two
processes: ``telemetry_overhead_pct`` = median step time with it / without it - 1.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fastbyol.config_parse import build_config
from fastbyol.data.views import Batch
from fastbyol.engine.trainer import Trainer, cuda_uuids, start_run
from fastbyol.errors import FastByolError
from fastbyol.telemetry.nvml import GpuSampler, aggregate, open_gpu_source, replaying
from fastbyol.telemetry.results import environment, quantile, time_calls, write_results
from fastbyol.telemetry.sinks import ProgressBar
from fastbyol.telemetry.throughput import throughput_fields

AXES = ("method", "batch", "compile", "kernels", "channels_last", "data", "telemetry")
METHODS = ("byol", "simclr")
DATA_KINDS = ("synthetic", "torch", "dali")
# A smoke run on a 2-core CPU: the smallest ResNet on small images, narrow heads.
QUICK_OVERRIDES = ["model.arch=resnet18", "model.small_stem=true", "data.image_size=32", "model.proj_hidden=64",
                   "model.proj_dim=32", "simclr.proj_hidden=64", "simclr.proj_dim=32"]


@dataclass
class Sweep:
    """Every axis is a list of values; the cases are their product (telemetry on/off share a trainer)."""

    preset: str = "synthetic-r50"
    overrides: Sequence[str] = ()
    method: Sequence[str] = ("byol",)
    """'byol' and/or 'simclr': the two methods side by side on the same data, device and settings."""
    batch: Sequence[int] = ()  # () = the preset's optim.batch_size
    compile: Sequence[str] = ("auto",)
    kernels: Sequence[str] = ("auto",)
    channels_last: Sequence[str] = ("auto",)
    data: Sequence[str] = ("synthetic",)
    telemetry: Sequence[str] = ("on", "off")
    steps: int = 30
    """Timed steps per case and telemetry mode."""
    warmup: int = 5
    rounds: int = 3
    """Alternating telemetry blocks per case (each mode gets steps // rounds steps per block)."""
    data_path: str = ""

    def validate(self) -> None:
        for value in self.method:
            if value not in METHODS:
                raise FastByolError(f"--method {value} is not a method: use {', '.join(METHODS)} (or byol,simclr)")
        for value in self.data:
            if value not in DATA_KINDS:
                raise FastByolError(f"--data {value} is not a data source: use {', '.join(DATA_KINDS)}")
        for value in self.telemetry:
            if value not in ("on", "off"):
                raise FastByolError(f"--telemetry {value}: use on, off or on,off")
        if any(b < 1 for b in self.batch):
            raise FastByolError("--batch needs positive batch sizes, e.g. --batch 128,256")
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1:
            raise FastByolError("--steps and --rounds must be >= 1 and --warmup >= 0")
        if self.steps < self.rounds:
            raise FastByolError(f"--steps {self.steps} is fewer than --rounds {self.rounds}: raise --steps")


def _held_step(trainer: Trainer, batches: Iterator[Batch]) -> None:
    step = trainer.step
    trainer.train_step(batches)
    trainer.step = step


def _counted_step(trainer: Trainer, batches: Iterator[Batch], bar: ProgressBar, done: list[int]) -> None:
    """``_held_step``, then the case's progress line (one per PLAIN_EVERY_S off a terminal, and the last)."""
    _held_step(trainer, batches)
    done[0] += 1
    bar.update(done[0], 1, None, force=done[0] == bar.total)


def _case_overrides(sweep: Sweep, case: dict[str, Any], out_dir: Path, name: str, folder: str) -> list[str]:
    overrides = [*sweep.overrides, f"method={case['method']}", f"run.out_dir={out_dir}", f"run.name={name}",
                 "run.progress=off",
                 "run.telemetry=on", f"run.compile={case['compile']}", f"run.kernels={case['kernels']}",
                 f"model.channels_last={case['channels_last']}", "run.ckpt_every=1000000000"]
    if case["batch"]:
        overrides.append(f"optim.batch_size={case['batch']}")
    if case["data"] == "synthetic":
        overrides.append("data.source=synthetic")
        overrides.append("model.online_probe=false")
    else:
        overrides += ["data.source=folder", f"data.path={folder}", f"data.loader={case['data']}"]
    return overrides


def _batches(trainer: Trainer, data: str) -> Iterator[Batch]:
    micro = trainer.batch_size // trainer.cfg.optim.accum_steps
    if data == "synthetic":  # one batch on the device, reused: no input pipeline in the timing
        batch = next(trainer.source.batches(0, micro, 1))
        views = batch.views.to(trainer.device, trainer.channels_last)
        return itertools.repeat(Batch(views, batch.labels, []))
    return trainer.source.batches(0, micro, 10**9)


def _set_telemetry(trainer: Trainer, on: bool) -> GpuSampler | None:
    """Phase events on/off, and a fresh NVML sampler for an 'on' block (where a driver is)."""
    trainer.phases.enabled = on
    trainer.phases.nvtx = on and trainer.device.type == "cuda"
    trainer.phases.read()
    if not on:
        return None
    if trainer.device.type != "cuda" and not replaying():
        return None
    source, _ = open_gpu_source(uuids=cuda_uuids())
    if source is None:
        return None
    sampler = GpuSampler(source, trainer.cfg.run.telemetry_hz)
    sampler.start()
    return sampler


def run_case(sweep: Sweep, case: dict[str, Any], out_dir: Path, folder: str) -> list[dict[str, Any]]:
    """One trainer, warm-up, then alternating telemetry blocks; one row per telemetry mode."""
    name = "-".join(f"{k}{v}" for k, v in case.items() if k != "telemetry").replace("/", "_")
    cfg = build_config(sweep.preset, overrides=_case_overrides(sweep, case, out_dir, name, folder))
    trainer = start_run(cfg)
    batches = _batches(trainer, case["data"])
    trainer.step = trainer.total_steps // 2  # past warm-up: the cost does not depend on lr or tau
    modes = list(case["telemetry"])
    per_block = max(1, sweep.steps // sweep.rounds)
    # A line per PLAIN_EVERY_S off a terminal (a perf_counter read per step otherwise: nothing next to a step).
    bar = ProgressBar(sweep.warmup + sweep.rounds * len(modes) * per_block, 0, enabled=True,
                      label=f"fastbyol bench: {name}", unit="step")
    step = partial(_counted_step, trainer, batches, bar, [0])
    for _ in range(sweep.warmup):
        step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
    blocks = _timed_blocks(trainer, step, modes, sweep.rounds, per_block)
    rows = [_mode_row(case, trainer, mode, blocks) for mode in modes]
    by_mode = {r["telemetry"]: r for r in rows}
    if "on" in by_mode and "off" in by_mode:
        overhead = 100.0 * (by_mode["on"]["median_ms"] / by_mode["off"]["median_ms"] - 1.0)
        by_mode["on"]["telemetry_overhead_pct"] = overhead
    del trainer, batches, step
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


@dataclass
class _Blocks:
    """What the timed blocks of one case measured, per telemetry mode."""

    times: dict[str, list[float]]
    walls: dict[str, float]
    waits: dict[str, float]
    phases: dict[str, dict[str, float]]
    samples: list[dict[str, Any]]


def _timed_blocks(trainer: Trainer, step: Callable[[], None], modes: list[str], rounds: int, per_block: int
                  ) -> _Blocks:
    """``rounds`` blocks of ``per_block`` steps in each telemetry mode, in ABBA order (cancels slow drift)."""
    blocks = _Blocks({m: [] for m in modes}, {m: 0.0 for m in modes}, {m: 0.0 for m in modes},
                     {m: {} for m in modes}, [])
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            sampler = _set_telemetry(trainer, mode == "on")
            trainer.meter.data_wait_s = 0.0
            try:
                # The step counter is held at one mid-run step: every timed step applies the same lr and
                # tau, and a short data set never runs past the schedules' end.
                block, wall = time_calls(step, trainer.device, per_block)
            finally:
                if sampler is not None:
                    sampler.set_step(trainer.step)
                    sampler.stop()
                    blocks.samples += sampler.drain()
            blocks.times[mode] += block
            blocks.walls[mode] += wall
            blocks.waits[mode] += trainer.meter.data_wait_s
            for phase, phase_ms in trainer.phases.read().items():
                blocks.phases[mode][phase] = blocks.phases[mode].get(phase, 0.0) + phase_ms
            trainer.meter.sums.clear()  # the metrics of the timed steps are not read: keep memory flat
            trainer.meter.micro_steps = 0
    return blocks


def _mode_row(case: dict[str, Any], trainer: Trainer, mode: str, blocks: _Blocks) -> dict[str, Any]:
    """One telemetry mode's row: step times, throughput, phases, memory, and with telemetry on the GPUs'."""
    cfg = trainer.cfg
    ms = sorted(blocks.times[mode])
    n = len(ms)
    median = statistics.median(ms)
    img_per_s = trainer.batch_size / (median / 1e3)
    wall = blocks.walls[mode]
    row: dict[str, Any] = {
        **{k: v for k, v in case.items() if k != "telemetry"},
        "telemetry": mode, "status": "ok", "arch": cfg.model.arch, "image_size": cfg.data.image_size,
        "batch": trainer.batch_size, "world": trainer.ctx.world, "bf16": trainer.bf16,
        "channels_last_used": trainer.channels_last, "compile_used": trainer.compile_mode,
        "kernels_used": trainer.kernels, "steps": n, "median_ms": median, "p10_ms": quantile(ms, 0.1),
        "p90_ms": quantile(ms, 0.9), "img_per_s": img_per_s,
        "img_per_s_wall": n * trainer.batch_size / wall if wall > 0 else None,
        "data_wait_ms": 1e3 * blocks.waits[mode] / n,
    }
    row.update(throughput_fields(img_per_s, trainer.ctx.world, trainer.gflop_per_image, trainer.peak_tflops))
    row["gflop_per_image"] = trainer.gflop_per_image
    for phase, total in sorted(blocks.phases[mode].items()):
        row[f"{phase}_ms"] = total / n
    if trainer.device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    if mode == "on" and blocks.samples:
        gpus = aggregate(blocks.samples)
        row["gpu_sm_util_pct"] = statistics.fmean(g["sm_util_pct"] for g in gpus if g["sm_util_pct"] is not None) \
            if any(g["sm_util_pct"] is not None for g in gpus) else None
        powers = [g["power_w"] for g in gpus if g["power_w"] is not None]
        row["gpu_power_w"] = sum(powers) if powers else None
        row["joule_per_image"] = sum(powers) / img_per_s if powers else None
        row["gpu_clock_events"] = " ".join(sorted({r for g in gpus for r in (g["clock_events"] or [])}))
    return row


def _image_folder(sweep: Sweep, tmp: Path) -> str:
    """The user's folder, or a small procedurally drawn JPEG folder when a sweep reads real files."""
    if sweep.data_path or all(d == "synthetic" for d in sweep.data):
        return sweep.data_path
    from fastbyol.data.builders import make_synthetic

    folder = tmp / "images"
    make_synthetic(str(folder), num_classes=4, train_per_class=64, val_per_class=1, size=96)
    return str(folder / "train")


def run_sweep(sweep: Sweep, out: Path, device: str = "auto") -> tuple[list[dict[str, Any]], Path]:
    """Every case of the sweep; a case that cannot run here (e.g. kernels on a CPU, DALI absent) gets a row
    with status 'skipped: <why>'. Writes ``<date>-<device>-bench.csv`` and ``.md`` under ``out``."""
    sweep.validate()
    rows: list[dict[str, Any]] = []
    telemetry = tuple(dict.fromkeys(sweep.telemetry))
    batches = sweep.batch or (0,)
    with tempfile.TemporaryDirectory(prefix="fastbyol-bench-") as tmp:
        folder = _image_folder(sweep, Path(tmp))
        for method, batch, compile_mode, kernels, channels_last, data in itertools.product(
                sweep.method, batches, sweep.compile, sweep.kernels, sweep.channels_last, sweep.data):
            case = {"method": method, "batch": batch, "compile": compile_mode, "kernels": kernels,
                    "channels_last": channels_last, "data": data, "telemetry": telemetry}
            sweep_overrides = list(sweep.overrides)
            if device != "auto":
                sweep_overrides.append(f"run.device={device}")
            try:
                rows += run_case(Sweep(**{**sweep.__dict__, "overrides": sweep_overrides}), case, Path(tmp), folder)
            except FastByolError as e:
                for mode in telemetry:
                    rows.append({**{k: v for k, v in case.items() if k != "telemetry"}, "telemetry": mode,
                                 "status": f"skipped: {e}"})
        if not rows:
            raise FastByolError("the sweep has no case: give at least one value for every axis")
        dev = torch.device("cuda") if torch.cuda.is_available() and device != "cpu" else torch.device("cpu")
        path = write_results(rows, environment(dev), out, "bench")
    return rows, path
