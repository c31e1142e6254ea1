"""Process groups for multi-process training: one process per GPU (or per CPU rank for tests and CI).

Launchers set the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):
``torchrun --nproc_per_node N -m fastbyol train ...`` on one node, ``deepspeed --hostfile H -m fastbyol
train ... run.engine=deepspeed`` across nodes. The backend is NCCL when the run is on CUDA and gloo on the
CPU, so the same code path runs in CI (gloo, CPU ranks) and on GPUs.

What every rank does identically: the model (same seeds), the optimizer step on the all-reduced
gradients, and the target EMA (from identical online weights, so targets never drift apart). What differs
per rank: its shard of each global batch (``fastbyol.data.stream.shard_positions``). Rank 0 alone writes
the run directory (config, metrics, checkpoints); the others wait for it at the points that need it.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastbyol.errors import FastByolError

# Long enough for rank 0 to write a multi-GB checkpoint while the others wait at the barrier after it.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    engine: str = "single"
    """'single', 'ddp' or 'deepspeed'."""
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.engine == "deepspeed"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise FastByolError(f"environment variable {name}={text!r} is not an integer: launch with torchrun "
                            "or the deepspeed launcher, which set it") from None


def launched_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return _env_int("WORLD_SIZE", 1)


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory op at init on the CPU (~45 s); gloo does not need it. The module
    must be imported by name: ``import deepspeed.comm.torch`` binds the torch package instead."""
    with_shm: Any = importlib.import_module("deepspeed.comm.torch")
    with_shm.build_shm_op = lambda: None


def init_distributed(engine: str, device: torch.device) -> DistContext:
    """Join the job the launcher started (or return the single-process context).

    ``engine`` is the config's run.engine ('auto', 'ddp', 'deepspeed'); ``device`` the run's device type
    decides the backend. Call once per process, before the model is built."""
    world = launched_world_size()
    if engine == "auto":
        engine = "ddp" if world > 1 else "single"
    if engine == "ddp" and world == 1:
        engine = "single"  # one process: DDP would only add a wrapper
    if engine == "single":
        return DistContext()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and world > 1:
        raise FastByolError(f"run.engine={engine} with WORLD_SIZE={world} but {missing[0]} is unset: start "
                            "the job with torchrun or the deepspeed launcher (scripts/launch_*.sh)")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FastByolError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                                "start at most one process per GPU (--nproc_per_node / --num_gpus)")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if engine == "deepspeed":
        try:
            import deepspeed
        except ImportError:
            raise FastByolError("run.engine=deepspeed needs DeepSpeed: pip install 'fastbyol[gpu]' "
                                "(or pip install deepspeed)") from None
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device.type != "cuda":
            _skip_deepspeed_shm_build()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=TIMEOUT)
    elif not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return DistContext(rank, world, local_rank, engine, backend)


def barrier(ctx: DistContext) -> None:
    """All ranks wait here (a host sync: used only around files, never inside the step)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (run directory names, errors found by rank 0)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (metrics at the log cadence)."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values.div_(ctx.world)
    return values


def all_reduce_sum_int(ctx: DistContext, value: int, device: torch.device) -> int:
    """The sum over ranks of a host integer (counts of skipped images); a host sync, at checkpoints only."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
