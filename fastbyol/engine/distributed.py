"""Process groups for multi-process training: one process per GPU (or per CPU rank for tests and CI).

Where a process learns its place in the job, in this order:
- torchrun or the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT`` (``torchrun --nproc_per_node N -m fastbyol train ...`` on one node; ``--nnodes M
  --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` across nodes, also under ``srun`` with one task per node);
- SLURM, one task per GPU (``srun -n 8 fastbyol train ...``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
  (else ``SLURM_NTASKS``), ``SLURM_LOCALID``, the master the first host of ``SLURM_STEP_NODELIST`` (else
  ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``), the port ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``;
- neither: one process. Other launchers' variables (mpirun's ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``) with
  more than one task are refused, since every task would train alone as rank 0 of 1.
The backend is NCCL when the run is on CUDA and gloo on the CPU, so the same code path runs in CI (gloo,
CPU ranks) and on GPUs.

What every rank does identically: the model (same seeds), the optimizer step on the all-reduced
gradients, and the target EMA (from identical online weights, so targets never drift apart). What differs
per rank: its shard of each global batch (``fastbyol.data.stream.shard_positions``). Rank 0 alone writes
the run directory (config, metrics, checkpoints, under its lock: ``fastbyol.engine.runlock``); the others
wait for it at the points that need it.
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
        raise FastByolError(f"environment variable {name}={text!r} is not an integer: launch with torchrun, "
                            "srun or the deepspeed launcher, which set it") from None


@dataclass(frozen=True)
class Launch:
    """What the launcher said about this process (``launch_env``)."""

    launcher: str
    """'torchrun' (torchrun, the deepspeed launcher, or any that sets WORLD_SIZE), 'slurm' or 'none'."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0


# Other launchers' task counts: with more than one task and no torchrun or SLURM variables, each task would
# train alone as rank 0 of 1 (and all would write the same run directory).
FOREIGN_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# SLURM's variables, most specific first: a job step's (srun) before the allocation's.
SLURM_TASKS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: 'gpu[07-09,12],cpu3' -> 'gpu07' (zero padding kept), the one
    ``scontrol show hostnames`` lists first."""
    item, depth = "", 0
    for ch in nodelist.strip():
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            break
        item += ch
    if "[" not in item:
        if not item:
            raise FastByolError(f"SLURM node list {nodelist!r} is empty: run the job under srun, or set "
                                "MASTER_ADDR to the first node's host name")
        return item
    prefix, _, rest = item.partition("[")
    ranges, _, suffix = rest.partition("]")
    return first_host(prefix + ranges.split(",")[0].split("-")[0] + suffix)  # 'r[1-2]-n[3-4]': one group at a time


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of the job derives alike (10000-29999 by job id), when MASTER_PORT is
    unset: two jobs sharing a node rarely collide; set MASTER_PORT where they do."""
    return 10000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def launch_env() -> Launch:
    """This process's place as its launcher set it (torchrun first, then SLURM), before any process group."""
    env = os.environ
    tasks = next((name for name in SLURM_TASKS if name in env), None)
    slurm_world = _env_int(tasks, 1) if tasks is not None and "SLURM_PROCID" in env else 1
    if "WORLD_SIZE" in env:
        if _env_int("WORLD_SIZE", 1) == 1 and slurm_world > 1:
            raise FastByolError(f"WORLD_SIZE=1 but SLURM started {slurm_world} tasks ({tasks}): each would train "
                                "alone; unset WORLD_SIZE (fastbyol reads SLURM's variables) or run one task")
        return Launch("torchrun", _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0),
                      env.get("MASTER_ADDR", ""), _env_int("MASTER_PORT", 0))
    if slurm_world > 1:
        nodelist = next((env[name] for name in SLURM_NODELISTS if name in env), "")
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        port = _env_int("MASTER_PORT", 0) or slurm_port(env.get("SLURM_JOB_ID", ""))
        return Launch("slurm", _env_int("SLURM_PROCID", 0), slurm_world, _env_int("SLURM_LOCALID", 0), addr, port)
    for name in FOREIGN_WORLD_SIZES:
        if _env_int(name, 1) > 1:
            raise FastByolError(f"{name}={env[name]}: this process was started as one of several tasks, but "
                                "fastbyol reads torchrun's or SLURM's variables only (each task would train "
                                "alone): launch with torchrun, srun or scripts/launch_*.sh")
    return Launch("none")


def launched_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return launch_env().world


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory op at init on the CPU (~45 s); gloo does not need it. The module
    must be imported by name: ``import deepspeed.comm.torch`` binds the torch package instead."""
    with_shm: Any = importlib.import_module("deepspeed.comm.torch")
    with_shm.build_shm_op = lambda: None


def init_distributed(engine: str, device: torch.device) -> DistContext:
    """Join the job the launcher started (or return the single-process context).

    ``engine`` is the config's run.engine ('auto', 'ddp', 'deepspeed'); ``device`` the run's device type
    decides the backend. Call once per process, before the model is built."""
    launch = launch_env()
    world = launch.world
    if engine == "auto":
        engine = "ddp" if world > 1 else "single"
    if engine == "ddp" and world == 1:
        engine = "single"  # one process: DDP would only add a wrapper
    if engine == "single":
        return DistContext()
    rank, local_rank = launch.rank, launch.local_rank
    if launch.launcher == "slurm":  # env:// rendezvous (and DeepSpeed) read torchrun's names
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
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


def all_reduce_sum_ints(ctx: DistContext, values: list[int], device: torch.device) -> list[int]:
    """The sums over ranks of host integers, in one collective (stop flags, counts of skipped images); a host
    sync, at the log cadence and checkpoints only."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def all_reduce_sum_int(ctx: DistContext, value: int, device: torch.device) -> int:
    """The sum over ranks of one host integer (``all_reduce_sum_ints``)."""
    return all_reduce_sum_ints(ctx, [value], device)[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
