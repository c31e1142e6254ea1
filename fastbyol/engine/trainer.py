"""The training loop: fetch -> forward/backward -> optimizer -> EMA -> log -> checkpoint.

One readable loop, no callbacks. The run directory holds ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/``, ``telemetry.json`` (the devices, the FLOP count, why GPU telemetry is off
if it is), ``gpu_samples.jsonl`` (the NVML timeline, with a GPU), optionally ``tensorboard/``, ``profile/`` and
``wandb/`` with ``wandb_id.txt`` (and ``report/`` at the end of a W&B run), and, when the data had unreadable files,
``skipped.txt``.

Several processes (``torchrun``): each rank builds the same model, converts every BatchNorm to the
cross-replica one (BYOL.md: statistics over the global batch) before DDP wraps it, reads its own shard of
each global batch, and steps LARS and the EMA identically; rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastbyol.config import Config
from fastbyol.config_checks import parse_profile_window
from fastbyol.config_parse import config_from_dict, parse_override, resumable_keys, set_key, valid_keys
from fastbyol.config_traits import OPTIMIZERS
from fastbyol.data.loader import ImageSource, build_source
from fastbyol.data.views import Batch
from fastbyol.engine import checkpoint, preempt
from fastbyol.engine.compile import compiled_forward, resolve_compile
from fastbyol.engine.distributed import (
    DistContext,
    all_reduce_mean_,
    all_reduce_sum_int,
    all_reduce_sum_ints,
    broadcast_object,
    init_distributed,
    launched_world_size,
)
from fastbyol.engine.flops import gflop_per_image
from fastbyol.engine.preempt import StopRequest
from fastbyol.engine.preflight import check_output, preflight
from fastbyol.engine.runlock import RunLock
from fastbyol.engine.update import build_update
from fastbyol.errors import FastByolError, RunStopped
from fastbyol.files import atomic_write_bytes
from fastbyol.kernels.launch import interpreted
from fastbyol.kernels.losses import FUSED_LOSSES
from fastbyol.model.network import Network
from fastbyol.model.syncbn import convert_global_batchnorm
from fastbyol.step.guard import NonFiniteGuard
from fastbyol.step.methods import build_method
from fastbyol.step.schedules import lr_schedule, warmup_steps_for
from fastbyol.step.train_step import REFERENCE_LOSSES, forward_backward
from fastbyol.telemetry.nvml import GpuSampler, aggregate, open_gpu_source, replaying
from fastbyol.telemetry.phases import PhaseTimer
from fastbyol.telemetry.sinks import JsonlMetrics, ProgressBar, TensorBoardSink, require_tensorboard
from fastbyol.telemetry.throughput import peak_bf16_tflops, throughput_fields
from fastbyol.telemetry.wandb_sink import WandbSink, require_wandb

CHECKPOINT_VERSION = 1
# Keys a resumed run may change (fields marked RESUMABLE); everything else must match the checkpoint's run.
RESUMABLE_OVERRIDES = resumable_keys()


class NonFiniteStop(FastByolError):
    """The run stopped on a non-finite loss or gradient (run.nonfinite=stop, or past the skip limit)."""


class FetchStopped(Exception):
    """A fetch failed after a stop signal (its process group's signal killed the loader's workers): the loop
    writes the stop checkpoint of the last finished step (``_checkpoint_if_due`` raises ``RunStopped``)."""


def check_batch_split(cfg: Config, world: int) -> None:
    """The global batch must split evenly into ranks x micro-batches."""
    parts = world * cfg.optim.accum_steps
    if cfg.optim.batch_size % parts:
        raise FastByolError(f"optim.batch_size={cfg.optim.batch_size} does not split over {world} ranks x "
                            f"optim.accum_steps={cfg.optim.accum_steps}: use a multiple of {parts}")


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cuda":
        raise FastByolError("run.device=cuda but no CUDA GPU is visible: use run.device=auto or run.device=cpu")
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def use_channels_last(setting: str, device: torch.device, convolutional: bool = True) -> bool:
    """'on', or 'auto' on CUDA for a convolutional encoder (a ViT's one convolution gains nothing from it)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda" and convolutional)


def use_kernels(setting: str, device: torch.device) -> bool:
    on = setting == "on" or (setting == "auto" and device.type == "cuda")
    if on and device.type != "cuda" and not interpreted():
        raise FastByolError("run.kernels=on needs a CUDA GPU (or TRITON_INTERPRET=1 to run the Triton kernels "
                            "in the interpreter, for tests): use run.kernels=auto or off on the CPU")
    return on


def kernels_misfit(cfg: Config) -> str | None:
    """Why run.kernels=auto turns the Triton kernels off for ``cfg`` on a GPU (None: they fit). Only the optimizer
    fused with the EMA (``OptimizerTraits.flat_fused``: LARS) applies one lr to every tensor, so a predictor at a
    multiple of the lr keeps the kernels with any other optimizer (they then do the EMA alone)."""
    if cfg.predictor_lr_mult() != 1 and OPTIMIZERS[cfg.optim.name].flat_fused:
        return (f"byol.predictor_lr_mult={cfg.predictor_lr_mult()}: the Triton kernels are off (the fused "
                f"optim.name={cfg.optim.name} applies one lr to every tensor)")
    return None


def cuda_uuids() -> list[str] | None:
    """The UUIDs of the CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied), so NVML samples the
    same GPUs; None where torch cannot tell."""
    try:
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except (AttributeError, RuntimeError):
        return None


def new_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out_dir) / name
    if checkpoint.list_checkpoints(run_dir / "checkpoints"):
        raise FastByolError(f"run directory {run_dir} already holds checkpoints: continue it with "
                            f"--resume {run_dir}, or choose another run.name")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create run directory {run_dir}: {e.strerror or e}; "
                            "set run.out_dir to a writable folder") from None
    return run_dir


@dataclass
class IntervalMeter:
    """Sums device tensors over one log interval; read (one host sync) only when a row is written."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_steps: int = 0
    steps: int = 0
    data_wait_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, torch.Tensor | None]) -> None:
        for name, value in values.items():
            if value is not None:
                self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.micro_steps += 1

    def means(self, ctx: DistContext | None = None) -> dict[str, float]:
        """Interval means, averaged over ranks when ``ctx`` spans several (then every rank must call it: it
        is a collective)."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n].float() for n in names]) / self.micro_steps
        if ctx is not None:
            all_reduce_mean_(ctx, stacked)
        # The one host sync of the interval: reading the summed device metrics.
        return dict(zip(names, stacked.tolist()))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run logs the same numbers."""
        return {"sums": dict(self.sums), "micro_steps": self.micro_steps, "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> IntervalMeter:
        sums = {name: t.to(device) for name, t in state["sums"].items()}
        return cls(sums, state["micro_steps"], state["steps"])


@dataclass(frozen=True)
class UserParts:
    """What a Python caller (``fastbyol.train``) brings in place of what the config would build: its encoder
    module (``model.arch=custom:...``: the online encoder, trained in place; the target's is a copy) and its
    images (``data.source=dataset``). Each takes the config's place once, where the run is built."""

    encoder: nn.Module | None = None
    images: ImageSource | None = None


class _RowSinks:
    """The metrics rows' sinks on rank 0 (metrics.jsonl, gpu_samples.jsonl, TensorBoard, W&B) and the progress bar.

    A row is due at the log cadence and at the run's true end only: a session stopped early (max_steps)
    keeps its partial interval in the checkpoint, so a resumed run logs the same rows as an uninterrupted one.
    """

    def __init__(self, trainer: Trainer, end_step: int, wandb: WandbSink | None = None) -> None:
        self.trainer = trainer
        self.wandb = wandb  # opened by Trainer._open_wandb, before metrics.jsonl is truncated
        self.last: dict[str, Any] = {}
        self.sink: JsonlMetrics | None = None
        self.samples: JsonlMetrics | None = None
        self.tensorboard: TensorBoardSink | None = None
        run_dir, step = trainer.run_dir, trainer.step
        if trainer.ctx.main:
            metrics_path, samples_path = run_dir / "metrics.jsonl", run_dir / "gpu_samples.jsonl"
            JsonlMetrics.truncate_after(metrics_path, step)
            JsonlMetrics.truncate_after(samples_path, step)
            self.sink = JsonlMetrics(metrics_path)
            self.samples = JsonlMetrics(samples_path) if trainer.sampler is not None else None
            self.tensorboard = (TensorBoardSink(run_dir / "tensorboard", resumed_at=step)
                                if trainer.cfg.run.tensorboard else None)
        self.progress = ProgressBar(end_step, step, enabled=trainer.cfg.run.progress != "off" and trainer.ctx.main)

    def due(self, step: int) -> bool:
        return step % self.trainer.cfg.run.log_every == 0 or step == self.trainer.total_steps

    def after_step(self) -> None:
        """Write a row if one is due (every rank computes it: the means are all-reduced), else tick the bar."""
        t = self.trainer
        if not self.due(t.step):
            self.progress.update(t.step, t.batch_size, self.last.get("loss"))
            return
        self.last = t._log_row()
        if self.sink is not None:
            self.sink.write(self.last)
        if self.samples is not None:
            self.samples.write_rows(t._last_samples)
        if self.tensorboard is not None:
            self.tensorboard.write(self.last)
        if self.wandb is not None:
            self.wandb.write(self.last)
        self.progress.update(t.step, t.batch_size, self.last["loss"], force=True)

    def __enter__(self) -> _RowSinks:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        """Close every sink; W&B gets the report when the run has reached its last step (not at run.max_steps or
        on a stop signal) and is marked failed, preempted (stopped by a signal) or done."""
        self.progress.close()
        for sink in (self.sink, self.samples, self.tensorboard):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            t = self.trainer
            if error is None and t.step == t.total_steps:
                self.wandb.log_report(t.run_dir, t.step)
            self.wandb.close(failed=error is not None, preempted=isinstance(error, RunStopped))



def keep_steps_for(epochs: list[float], images_per_epoch: int, batch_size: int,
                   total_steps: int, last_epoch: float | None = None) -> dict[int, list[float]]:
    """step -> the run.keep_epochs it completes: epoch e at the first step whose images reach e epochs
    (``ceil(e * N / batch)``); epochs past the run's last step are left out, except those up to ``last_epoch``
    (run.epochs): the schedule drops the last partial batch (``epochs * N // batch`` steps), so the run's own
    last epoch, which it completes but for fewer than ``batch`` images, is kept at its last step."""
    steps: dict[int, list[float]] = {}
    for epoch in sorted(set(epochs)):
        step = max(1, math.ceil(epoch * images_per_epoch / batch_size - 1e-9))
        if step > total_steps and last_epoch is not None and epoch <= last_epoch:
            step = total_steps
        if step <= total_steps:
            steps.setdefault(step, []).append(epoch)
    return steps


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: dict[str, Any] | None = None,
                 ctx: DistContext | None = None, lock: RunLock | None = None, parts: UserParts | None = None
                 ) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.lock = lock  # rank 0's hold on the run directory (start_run, resume_run), released by train()
        self.ctx = ctx or DistContext()
        check_batch_split(cfg, self.ctx.world)
        self.device = resolve_device(cfg.run.device)
        self.bf16 = use_bf16(cfg.run.precision, self.device)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)

        parts = parts or UserParts()
        self.source = build_source(cfg.data, cfg.run.seed, self.device, parts.images)
        probe_classes = self.source.num_classes if cfg.model.online_probe else 0
        self.kernels = use_kernels(cfg.run.kernels, self.device)
        why_off = kernels_misfit(cfg) if self.kernels and cfg.run.kernels == "auto" else None
        if why_off:
            self.kernels = False
            if self.ctx.main:
                print(f"fastbyol: {why_off}", file=sys.stderr)
        # BYOL, or SimCLR: one network, NT-Xent, no target and no EMA; its loss with the kernels or without
        self.method = build_method(cfg, FUSED_LOSSES if self.kernels else REFERENCE_LOSSES)
        self._build_schedules()  # the lr's, and the method's target schedule
        self.pair = self._build_pair(probe_classes, parts.encoder)
        groups = self.method.param_groups(self.pair)
        self.updater = build_update(cfg, self.ctx, self.pair, groups, self.kernels, self.device, run_dir, resume,
                                    self.method.runs_under_zero)
        self.optimizer = self.updater.optimizer
        self.model = self.updater.network  # what the forward calls: the pair, DDP or DeepSpeed around it
        self.compile_mode = resolve_compile(cfg.run.compile, self.device)
        self.forward = compiled_forward(self.compile_mode,
                                        network_only=not self.method.compiles_with_loss(self.ctx.world))
        self.guard = self._build_guard()
        self.nonfinite_skipped = 0  # steps skipped so far in the run (run.nonfinite=skip)
        self._interval_nonfinite = 0  # ... since the last metrics row
        self._build_telemetry(probe_classes, parts.encoder)
        self.stop = StopRequest()  # SIGTERM/SIGINT: finish the step, checkpoint, exit 75
        self.clock = time.monotonic  # for run.ckpt_minutes (a test sets its own)
        self.profile_window = parse_profile_window(cfg.run.profile) if cfg.run.profile else None
        self._profiler: Any = None

        self.step = 0  # optimizer steps done
        self.position = 0  # samples consumed from the data stream
        self.skipped = 0
        self.meter = IntervalMeter()
        if resume is not None:
            self._load(resume)

    def _build_schedules(self) -> None:
        """Steps of the run, and the lr and tau of every step (host arrays: no device work)."""
        cfg = self.cfg
        self.images_per_epoch = self.source.images_per_epoch
        self.batch_size = cfg.optim.batch_size
        self.total_steps = cfg.total_steps(self.images_per_epoch)
        warmup = warmup_steps_for(cfg.optim.warmup_epochs, self.images_per_epoch, self.batch_size)
        peak_lr = cfg.optim.base_lr * self.batch_size / 256
        self.lr = lr_schedule(self.total_steps, warmup, peak_lr)
        self.tau = self.method.target_schedule(cfg, self.total_steps)
        self.keep_steps = keep_steps_for(cfg.run.keep_epochs, self.images_per_epoch, self.batch_size,
                                         self.total_steps, cfg.run.epochs)

    def _build_pair(self, probe_classes: int, encoder: nn.Module | None) -> Network:
        """The method's network (around the user's ``encoder`` if given) on the device, in training mode, with
        cross-replica BatchNorm over ranks."""
        pair = self.method.network(self.cfg, self.cfg.run.seed, probe_classes, encoder).to(self.device)
        self.channels_last = use_channels_last(self.cfg.model.channels_last, self.device,
                                               pair.encoder.convolutional)
        if self.channels_last:
            pair = pair.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        pair.train()
        if self.ctx.world > 1:  # before DDP wraps it and before the flat buffers take the parameters
            convert_global_batchnorm(pair)
        return pair

    def _build_telemetry(self, probe_classes: int, encoder: nn.Module | None) -> None:
        """Phase timing (events, read at the log cadence), FLOPs for MFU, the NVML sampler (rank 0)."""
        cfg = self.cfg
        self.telemetry = cfg.run.telemetry == "on"
        self.phases = PhaseTimer(self.device, enabled=self.telemetry)
        # Counted once, on rank 0 (the only one writing rows): ~1.7 s for ResNet-50 on a 2-core CPU.
        self.gflop_per_image = (gflop_per_image(cfg, cfg.data.image_size, probe_classes, encoder)
                                if self.telemetry and self.ctx.main else None)
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else f"cpu ({os.cpu_count()} cores)")
        self.peak_tflops = cfg.run.peak_tflops or (
            peak_bf16_tflops(self.device_name) if self.device.type == "cuda" and self.bf16 else None)
        self.sampler: GpuSampler | None = None
        self._last_samples: list[dict[str, Any]] = []
        if cfg.run.tensorboard and self.ctx.main:
            require_tensorboard()
        if cfg.run.wandb and self.ctx.main:
            require_wandb(cfg.run.wandb)

    def _build_guard(self) -> NonFiniteGuard:
        online_ids = {id(p) for p in self.pair.online_parameters()}
        named = [(name, p) for name, p in self.pair.named_parameters() if id(p) in online_ids]
        protect = None  # with run.nonfinite=skip: everything a step writes (the strategy knows what)
        if self.cfg.run.nonfinite == "skip":
            protect = self.updater.protected([p for _, p in named], list(self.pair.buffers()))
        return NonFiniteGuard([n for n, _ in named], [p for _, p in named], self.device, protect)

    def _check_nonfinite(self) -> None:
        """Read the guard (a host sync: called at the log cadence and before a checkpoint only); raise with
        the diagnostic under 'stop' or past the skip limit; count the skipped steps."""
        bad = self.guard.read()
        if bad is None:
            return
        policy, limit = self.cfg.run.nonfinite, self.cfg.run.nonfinite_max_skips
        if policy == "stop" or self.nonfinite_skipped + bad.count > limit:
            kept = checkpoint.list_checkpoints(self.run_dir / "checkpoints")
            last = f"the last checkpoint, {kept[0][1]}, is from before it" if kept else "no checkpoint was written"
            why = "run.nonfinite=stop" if policy == "stop" else f"more than {limit} skipped steps"
            raise NonFiniteStop(f"non-finite loss or gradients at {bad.describe()} ({bad.count} bad step(s); "
                                f"{why}); {last}: resume it with a lower optim.base_lr, or set "
                                "run.nonfinite=skip")
        self.nonfinite_skipped += bad.count
        self._interval_nonfinite += bad.count
        if self.ctx.main:
            print(f"fastbyol: skipped {bad.count} non-finite step(s) (optimizer, EMA and BatchNorm statistics "
                  f"untouched), the first at {bad.describe()}", file=sys.stderr)

    # -- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (every rank calls it: the skipped-image count is summed over ranks)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "position": self.position,
            "epoch": self.position / self.images_per_epoch,
            "skipped": all_reduce_sum_int(self.ctx, self.skipped, self.device),
            "nonfinite_skipped": self.nonfinite_skipped,
            "model": self.updater.model_state(),
            "optimizer": self.updater.optimizer_state(),
            "meter": self.meter.state(),
            "rng": rng,
        }

    def _load(self, state: dict[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise FastByolError(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}: "
                                "it was written by another fastbyol release")
        self.updater.load(state)
        self.step, self.position = state["step"], state["position"]
        self.skipped = state["skipped"] if self.ctx.main else 0  # a global count: rank 0 carries it
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.meter = IntervalMeter.from_state(state["meter"], self.device)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save_checkpoint(self) -> Path:
        """Rank 0 writes (atomically); every rank returns once the file is complete, or raises its error."""
        ckpt_dir, keep = self.run_dir / "checkpoints", self.cfg.run.keep_last
        tag = self.updater.save_shards(ckpt_dir, self.step)  # DeepSpeed's first; the fastbyol file commits them
        state = self.state_dict()
        if tag is not None:
            state["deepspeed_tag"] = tag
        if not self.ctx.enabled:
            return checkpoint.save(state, ckpt_dir, self.step, keep)
        path, error = None, None
        if self.ctx.main:
            try:
                path = checkpoint.save(state, ckpt_dir, self.step, keep)
            except checkpoint.CheckpointError as e:
                error = str(e)
        path, error = broadcast_object(self.ctx, (path, error))  # also the barrier: the file is complete
        if error is not None:
            raise checkpoint.CheckpointError(error)
        if tag is not None and self.ctx.main:
            kept = {checkpoint.load(p).get("deepspeed_tag", "") for _, p in checkpoint.list_checkpoints(ckpt_dir)}
            self.updater.prune_shards(ckpt_dir, kept)
        return Path(path)

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Fetch, step, log, checkpoint until the run's end (or run.max_steps); each of the last three
        decides its own timing (``_RowSinks.due``, ``_checkpoint_if_due``, the profile window's edges)."""
        cfg = self.cfg
        end_step = min(self.total_steps, cfg.run.max_steps or self.total_steps)
        accum = cfg.optim.accum_steps
        micro_batch = self.batch_size // (accum * self.ctx.world)  # this rank's share of a micro-step
        wandb = self._open_wandb()  # first: a W&B run that cannot start stops every rank here
        if self.ctx.main:
            self._start_telemetry()  # the NVML sampler: rows then carry its samples
        rows = _RowSinks(self, end_step, wandb)
        batches = self.source.batches(self.position, micro_batch, (end_step - self.step) * accum,
                                      self.ctx.rank, self.ctx.world)
        self.meter.t0 = t_start = time.perf_counter()
        start_step = self.step
        self.stop.install()
        self._last_ckpt_time = self.clock()
        self.guard.set_step(self.step)
        try:
            with rows:  # closed with how the session ended (W&B: done, failed or preempted)
                while self.step < end_step:
                    self._profile_start_if_due()
                    self._train_step_or_stop(batches, end_step)  # fetch, forward/backward, optimizer, EMA
                    self._profile_stop_if_due()
                    rows.after_step()  # log
                    self._checkpoint_if_due(end_step)  # checkpoint
        finally:
            self.stop.restore()
            if self.lock is not None:
                self.lock.release()
            if self._profiler is not None:
                self._stop_profiler(self._profiler)
            if self.sampler is not None:
                self.sampler.stop()
        wall = time.perf_counter() - t_start
        return {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                "last": rows.last, "wall_s": wall,
                "img_per_s": (self.step - start_step) * self.batch_size / wall if wall > 0 else 0.0}

    def _open_wandb(self) -> WandbSink | None:
        """run.wandb: rank 0 opens the W&B run (resuming its id from the run directory); an error there (no login,
        no network) stops every rank before the first step, with the run directory unlocked."""
        run, error = None, None
        if self.cfg.run.wandb and self.ctx.main:
            r = self.cfg.run
            try:
                run = WandbSink(self.run_dir, r.wandb, r.wandb_entity, r.wandb_name, r.wandb_tags,
                                self.cfg.to_dict(), resumed_at=self.step)
            except FastByolError as e:
                error = str(e)
        if self.cfg.run.wandb:
            error = broadcast_object(self.ctx, error)
        if error is not None:
            if self.lock is not None:
                self.lock.release()
            raise FastByolError(error)
        return run

    def _profile_start_if_due(self) -> None:
        """run.profile=A:B: the profiler starts before step A ..."""
        if self.profile_window and self.step == self.profile_window[0]:
            self._profiler = self._start_profiler()

    def _profile_stop_if_due(self) -> None:
        """... and stops once steps A..B-1 are done."""
        if self._profiler is not None and self.profile_window and self.step >= self.profile_window[1]:
            self._stop_profiler(self._profiler)

    def _train_step_or_stop(self, batches: Iterator[Batch], end_step: int) -> None:
        """``train_step``; if the stop signal took the loader's workers before the step's fetch, the stop
        checkpoint of the last finished step instead (``_checkpoint_if_due`` raises ``RunStopped``)."""
        try:
            self.train_step(batches)
        except FetchStopped:
            self._checkpoint_if_due(end_step)
            raise

    def _checkpoint_if_due(self, end_step: int) -> None:
        """At the checkpoint cadence, at the end, on a stop signal or when run.ckpt_minutes have passed; a stop
        before the end raises ``RunStopped`` once the checkpoint is written (after SLURM's SIGUSR1, rank 0 has
        requeued the job by then)."""
        stop, requeue, time_due = self._stop_or_time_due(self._last_ckpt_time)
        kept_epochs = self.keep_steps.get(self.step, [])
        if not (self.step % self.cfg.run.ckpt_every == 0 or self.step == end_step or stop or time_due
                or kept_epochs):
            return
        self._check_nonfinite()  # never write the weights of a bad step
        path = self.save_checkpoint()
        if self.ctx.main:
            for epoch in kept_epochs:  # run.keep_epochs: a second name that keep_last's pruning leaves alone
                checkpoint.keep_epoch(path, epoch)
        self._last_ckpt_time = self.clock()
        if stop and self.step < end_step:
            then = f"continue with fastbyol train --resume {self.run_dir}"
            if requeue and self.ctx.main:
                requeued, what = preempt.requeue()
                then = what if requeued else f"{what}; {then}"
            by = self.stop.name or f"{preempt.REQUEUE_SIGNAL.name if requeue else 'a signal'} on another rank"
            raise RunStopped(f"stopped by {by} at step {self.step}/{self.total_steps}; "
                             f"checkpoint {path} written; {then}")

    def _stop_or_time_due(self, last_ckpt_time: float) -> tuple[bool, bool, bool]:
        """(a signal asked to stop, it was SLURM's requeue signal, the wall-time checkpoint is due). One process:
        after every step, from host state only. Several ranks must agree on the step, so they decide together at
        the log cadence (a sync point already): any rank's signal stops all (and any rank's SIGUSR1 requeues);
        rank 0's clock decides the timed checkpoint."""
        minutes = self.cfg.run.ckpt_minutes
        due = minutes > 0 and self.clock() - last_ckpt_time >= 60 * minutes
        requeue = self.stop.signum == preempt.REQUEUE_SIGNAL
        if not self.ctx.enabled:
            return self.stop.requested, requeue, due
        if self.step % self.cfg.run.log_every:
            return False, False, False
        stops, requeues, due_on_main = all_reduce_sum_ints(
            self.ctx, [int(self.stop.requested), int(requeue), int(due and self.ctx.main)], self.device)
        return stops > 0, requeues > 0, due_on_main > 0

    def train_step(self, batches: Iterator[Batch]) -> None:
        """One optimizer step: per micro-batch fetch and forward/backward, then LARS and the EMA. No host
        sync: the metrics and the phase events stay on the device until the log row reads them."""
        accum = self.cfg.optim.accum_steps
        self.guard.snapshot()  # skip policy: what the step writes, to put back if it is not finite
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            t_wait = time.perf_counter()
            with self.phases.host_range("data_wait"):
                try:
                    batch = next(batches)  # fetch
                except Exception:
                    # A stop signal sent to the process group killed the loader's workers: nothing of this step
                    # has touched the weights, so the run stops at the last finished one with its checkpoint.
                    if self.stop.requested and not self.ctx.enabled:
                        raise FetchStopped from None
                    raise
            self.meter.data_wait_s += time.perf_counter() - t_wait
            with self.updater.grad_sync(micro == accum - 1):
                self.forward_backward_step(batch, 1.0 / accum, micro == accum - 1)  # forward/backward
        ok = self.guard.check({"loss": self._last_out.loss, "probe_loss": self._last_out.probe_loss})
        self.update()  # optimizer, EMA
        self.guard.restore_if_bad(ok)
        self.guard.advance()
        self.step += 1
        self.position += self.batch_size
        self.meter.steps += 1
        if self.sampler is not None:
            self.sampler.set_step(self.step)

    def _start_telemetry(self) -> None:
        """Rank 0: the NVML sampler (with a GPU and a driver) and telemetry.json; one line says why GPU
        telemetry is off when it is."""
        reason = "run.telemetry=off"
        if self.telemetry:
            if self.device.type != "cuda" and not replaying():
                reason = "the run is on the CPU"
            else:
                source, reason = open_gpu_source(uuids=cuda_uuids())
                if source is not None:
                    self.sampler = GpuSampler(source, self.cfg.run.telemetry_hz)
                    self.sampler.set_step(self.step)
                    self.sampler.start()
            if self.sampler is None:
                print(f"fastbyol: GPU telemetry off: {reason}", file=sys.stderr)
        info = {"gpu_telemetry": self.sampler is not None, "reason": "" if self.sampler else reason,
                "devices": self.sampler.devices if self.sampler else [], "device": self.device_name,
                "world": self.ctx.world, "precision": "bf16" if self.bf16 else "fp32",
                "gflop_per_image": self.gflop_per_image, "peak_tflops": self.peak_tflops,
                "sample_hz": self.cfg.run.telemetry_hz if self.sampler else None}
        atomic_write_bytes(self.run_dir / "telemetry.json", json.dumps(info, indent=2).encode())

    def _start_profiler(self) -> Any:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        profiler.__enter__()
        self.phases.profiling = True
        self._profile_first = self.step
        return profiler

    def _stop_profiler(self, profiler: Any) -> None:
        """Close the window; every rank writes its trace (Chrome trace JSON: chrome://tracing, Perfetto)."""
        self.phases.profiling = False
        self._profiler = None
        profiler.__exit__(None, None, None)
        out = self.run_dir / "profile"
        out.mkdir(exist_ok=True)
        stem = f"steps-{self._profile_first}-{self.step - 1}-rank{self.ctx.rank}"
        profiler.export_chrome_trace(str(out / f"trace-{stem}.json"))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        atomic_write_bytes(out / f"summary-{stem}.txt", table.encode())
        if self.ctx.main:
            print(f"fastbyol: profile of steps {self._profile_first}-{self.step - 1} written to {out}",
                  file=sys.stderr)

    def forward_backward_step(self, batch: Batch, loss_scale: float, last_micro_step: bool = True) -> None:
        """One micro-batch: to the device, forward (compiled or eager), backward into the online grads;
        its metrics stay on the device in the meter."""
        if batch.skipped:
            self._record_skipped(batch.skipped)
        views = batch.views.to(self.device, self.channels_last)
        labels = batch.labels.to(self.device, non_blocking=True) if batch.labels is not None else None
        self.phases.start("forward")
        out = forward_backward(self.model, views, labels, self.updater.loss_scale(loss_scale), self.bf16,
                               self.method.loss, forward=self.forward, backward=self.updater.backward,
                               phase=self.phases.start)
        self.updater.micro_step_done(last_micro_step)
        self.phases.stop()
        self._last_out = out
        self.meter.add(out._asdict())

    def update(self) -> None:
        """LARS at this step's lr, then the target EMA at its tau (once per optimizer step). With the fused
        kernels the EMA runs inside the optimizer's pass, so the phase timer sees one 'optimizer' phase."""
        lr, tau = float(self.lr[self.step]), self._tau(self.step)
        self.phases.start("optimizer")
        self.updater.apply(lr, tau, self.phases)
        self.phases.stop()

    def _tau(self, k: int) -> float:
        """Step k's tau: the method's target schedule, or 1.0 (nothing moves) for a method without a target."""
        return 1.0 if self.tau is None else float(self.tau[k])

    def _log_row(self) -> dict[str, Any]:
        m = self.meter
        elapsed = time.perf_counter() - m.t0
        means = m.means(self.ctx)  # the interval's one host sync: every phase event has completed after it
        self._check_nonfinite()
        nonfinite, self._interval_nonfinite = self._interval_nonfinite, 0
        skipped = all_reduce_sum_int(self.ctx, self.skipped, self.device)
        k = self.step - 1  # the step whose lr/tau were just applied
        img_per_s = m.steps * self.batch_size / elapsed if elapsed > 0 else 0.0
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.position / self.images_per_epoch, 6),
            "loss": means["loss"],
            "proj_std": means["proj_std"],
            "proj_std_uniform": 1.0 / math.sqrt(self.cfg.proj_dim()),
            "lr": float(self.lr[k]),
            **self.method.row_fields(self._tau(k)),  # BYOL's tau; SimCLR has no target
            "img_per_s": img_per_s,
            "data_wait_frac": m.data_wait_s / elapsed if elapsed > 0 else 0.0,
            "skipped_images": skipped,
            "nonfinite_steps": nonfinite,
        }
        if "probe_loss" in means:
            row["probe_loss"], row["probe_top1"] = means["probe_loss"], 100.0 * means["probe_top1"]
        if self.telemetry:
            row.update(self._telemetry_fields(img_per_s, m))
        self.meter = IntervalMeter()
        return row

    def _telemetry_fields(self, img_per_s: float, m: IntervalMeter) -> dict[str, Any]:
        """Throughput, MFU, per-step phase times, peak memory and the GPUs' interval summary (rank 0's
        node). Phase times measured since a resume start there (the meter's partial interval has none)."""
        fields: dict[str, Any] = throughput_fields(img_per_s, self.ctx.world, self.gflop_per_image, self.peak_tflops)
        steps = max(m.steps, 1)
        phase_ms = {"data_wait": 1e3 * m.data_wait_s / steps}
        phase_ms.update({name: ms / steps for name, ms in self.phases.read().items()})
        fields["phase_ms"] = {name: round(ms, 4) for name, ms in phase_ms.items()}
        if self.device.type == "cuda":  # allocator statistics: host-side counters, no device sync
            fields["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        else:  # the process's high-water resident set (Linux reports KiB), since it started
            fields["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self._last_samples = self.sampler.drain() if self.sampler is not None else []
        if self._last_samples:
            fields["gpus"] = aggregate(self._last_samples)
        return fields

    def _record_skipped(self, messages: list[str]) -> None:
        self.skipped += len(messages)
        rank = f"rank {self.ctx.rank} " if self.ctx.world > 1 else ""
        with open(self.run_dir / "skipped.txt", "a", encoding="utf-8") as f:  # one short line per append
            for msg in messages:
                f.write(f"{rank}step {self.step}: {msg}\n")


# Fields of a metrics row that depend on wall-clock time (excluded when comparing runs).
TIMING_FIELDS = ("img_per_s", "data_wait_frac", "img_per_s_per_gpu", "tflop_per_s", "mfu_pct", "phase_ms",
                 "peak_mem_gib", "peak_rss_gib", "gpus")


def _claim(ctx: DistContext, claim: Callable[[], tuple[Path, RunLock]]) -> tuple[Path, RunLock | None]:
    """Rank 0 runs ``claim`` (make or find the run directory, lock it, write its config.yaml); every rank gets
    the directory, or rank 0's error, so a refused job stops on all ranks before anything is written."""
    run_dir, lock, error = None, None, None
    if ctx.main:
        try:
            run_dir, lock = claim()
        except FastByolError as e:
            error = str(e)
    run_dir, error = broadcast_object(ctx, (run_dir, error))
    if error is not None:
        raise FastByolError(error)
    assert run_dir is not None
    return run_dir, lock


def _locked(run_dir: Path, cfg: Config) -> RunLock:
    """The run directory's lock, then its config.yaml (written only by the lock's holder)."""
    lock = RunLock.acquire(run_dir)
    try:
        atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
    except BaseException:
        lock.release()
        raise
    return lock


def _trainer(cfg: Config, run_dir: Path, ctx: DistContext, lock: RunLock | None,
             resume: dict[str, Any] | None = None, parts: UserParts | None = None) -> Trainer:
    try:
        return Trainer(cfg, run_dir, resume=resume, ctx=ctx, lock=lock, parts=parts)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def start_run(cfg: Config, parts: UserParts | None = None) -> Trainer:
    device = resolve_device(cfg.run.device)  # fail on a missing GPU before anything is written
    check_batch_split(cfg, launched_world_size())
    preflight(cfg)  # the CLI ran it before importing torch; the Python API's runs get it here
    ctx = init_distributed(cfg.run.engine, device)
    existed = (Path(cfg.run.out_dir) / (cfg.run.name or "\0")).exists()

    def claim() -> tuple[Path, RunLock]:
        run_dir = new_run_dir(cfg)
        return run_dir, _locked(run_dir, cfg)

    run_dir, lock = _claim(ctx, claim)
    try:
        return _trainer(cfg, run_dir, ctx, lock, parts=parts)
    except FastByolError:
        if not existed and ctx.main:  # a bad data path leaves no empty run directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_run(target: str, overrides: list[str], parts: UserParts | None = None) -> Trainer:
    """Continue the run of a checkpoint (file or run directory) with its own config; only the keys in
    RESUMABLE_OVERRIDES (the fields marked ``config.RESUMABLE``) may change."""
    run_dir, state = checkpoint.resolve_resume(target)
    if "imported" in state:
        raise FastByolError(f"{target} was imported from {state['imported'].get('source', 'another code')} (fastbyol "
                            "import official): it holds the networks, not a training state (data position, "
                            "optimizer), so it cannot resume; evaluate or export it, or start a new run")
    cfg = config_from_dict(state["config"])
    for text in overrides:
        key, value = parse_override(text)
        if key not in RESUMABLE_OVERRIDES:
            raise FastByolError(f"cannot change {key} when resuming (the run's math depends on it): "
                                f"only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change")
        set_key(cfg, key, value)
    cfg.validate()
    check_batch_split(cfg, launched_world_size())
    check_output(cfg, run_dir)
    ctx = init_distributed(cfg.run.engine, resolve_device(cfg.run.device))
    _, lock = _claim(ctx, lambda: (run_dir, _locked(run_dir, cfg)))
    return _trainer(cfg, run_dir, ctx, lock, resume=state, parts=parts)


def _value(cfg: Config, key: str) -> Any:
    """The value of ``section.field`` (or of a top-level key such as ``method``)."""
    section, dot, name = key.partition(".")
    return getattr(getattr(cfg, section), name) if dot else getattr(cfg, key)


def auto_resume(cfg: Config, parts: UserParts | None = None) -> tuple[Trainer, bool]:
    """``--resume auto``: the same command starts the run the first time and continues it afterwards (a
    requeued cluster job). The run directory is run.out_dir/run.name; with a valid checkpoint there the
    run resumes, provided the command's config matches the saved one outside RESUMABLE_OVERRIDES (those
    take the command's values); without one it starts. Returns (trainer, resumed)."""
    if not cfg.run.name:
        raise FastByolError("--resume auto needs run.name=NAME, so that the same command finds its run again")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if not checkpoint.list_checkpoints(run_dir / "checkpoints"):
        return start_run(cfg, parts), False
    _, state = checkpoint.resolve_resume(str(run_dir))
    saved = config_from_dict(state["config"])
    changed = []
    for key in valid_keys():
        ours, theirs = _value(cfg, key), _value(saved, key)
        if ours == theirs:
            continue
        if key not in RESUMABLE_OVERRIDES:
            raise FastByolError(f"--resume auto: {run_dir} holds a run with {key}={theirs!r}, but this command "
                                f"says {ours!r}: use the run's settings, or another run.name for a new run")
        changed.append(f"{key}={ours}")
    return resume_run(str(run_dir), changed, parts), True
