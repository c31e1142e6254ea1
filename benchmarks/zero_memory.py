"""Memory per rank under DeepSpeed ZeRO stages 0-3: the real trainer (run.engine=deepspeed) on N ranks.

Each stage is one job started with torchrun (gloo on the CPU, NCCL on GPUs); every rank reports, after
``--steps`` training steps:
  * ``params_mib``: the online parameters this rank holds between steps (ZeRO-3: its shards);
  * ``optim_mib``: the optimizer-side tensors it holds: LARS momentum (ZeroLARS state or LARS state at
    stage 0) plus DeepSpeed's fp32 partitions (stages 1-3: a master copy, even of an fp32 model);
  * ``peak_rss_mib`` / ``peak_gpu_mib``: the process's peak resident memory (CPU) or peak allocated CUDA
    memory, which include activations, the replicated target, and the framework itself.
The table holds the largest value over ranks. The target network (a replicated fp32 copy of the tower)
is the same at every stage and counted in the peaks only.

    python -m benchmarks.zero_memory --arch resnet50 --stages 0,1,2,3 --world 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

MIB = 1 << 20


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(trainer: Any) -> dict[str, float]:
    engine, optimizer = trainer.updater.engine, trainer.optimizer
    stage = engine.zero_optimization_stage()
    online = trainer.pair.online_parameters()
    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in online]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    zero = engine.optimizer
    partitions: list[torch.Tensor] = []
    if stage in (1, 2):
        partitions = list(zero.single_partition_of_fp32_groups)
    elif stage == 3:
        partitions = list(zero.fp32_partitioned_groups_flat)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"params_mib": _bytes(params) / MIB, "optim_mib": (_bytes(state) + _bytes(partitions)) / MIB,
            "peak_rss_mib": peak_rss / MIB, "peak_gpu_mib": peak_gpu / MIB}


def _worker(args: argparse.Namespace) -> None:
    from fastbyol.config_parse import build_config
    from fastbyol.engine.distributed import shutdown
    from fastbyol.engine.trainer import start_run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [
        f"model.arch={args.arch}", "model.small_stem=true", f"data.image_size={args.image_size}",
        f"data.num_images={max(64, args.batch * world * (args.steps + 1))}", "data.workers=0",
        f"optim.batch_size={args.batch * world}", "optim.warmup_epochs=0", "run.epochs=100",
        f"run.max_steps={args.steps}", "run.ckpt_every=1000000", "run.progress=off", "run.log_every=1000000",
        f"run.out_dir={args.out_dir}", f"run.name=zero{args.stage}", "run.engine=deepspeed",
        f"run.zero_stage={args.stage}", "run.kernels=off"]
    trainer = start_run(build_config("smoke", overrides=overrides))
    trainer.train()
    row = {"rank": trainer.ctx.rank, **_measure(trainer)}
    print("ZERO_MEMORY " + json.dumps(row), flush=True)
    shutdown(trainer.ctx)


def run_stage(stage: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world),
               "-m", "benchmarks.zero_memory", "--worker", "--stage", str(stage), "--arch", args.arch,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--out-dir", tmp]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"zero_memory: stage {stage} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    ranks = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
             if line.startswith("ZERO_MEMORY ")]
    if len(ranks) != args.world:
        raise SystemExit(f"zero_memory: stage {stage}: {len(ranks)} of {args.world} ranks reported")
    keys = ("params_mib", "optim_mib", "peak_rss_mib", "peak_gpu_mib")
    return {"zero_stage": stage, "world": args.world, "arch": args.arch, "image_size": args.image_size,
            "batch_per_rank": args.batch, **{k: max(r[k] for r in ranks) for k in keys}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images per rank per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    from benchmarks.harness import environment, write_results

    rows = [run_stage(int(s), args) for s in args.stages.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_results(rows, environment(device), args.out, f"zero-memory-{args.arch}-{args.world}ranks")


if __name__ == "__main__":
    main()
