"""Helpers shared by the multi-rank tests (test_distributed.py, test_deepspeed.py): launch a job the way
the README does, and compare two runs' checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# ResNet-18 with the small stem on 16 px procedural images; a global batch of 16 = 2 ranks x 8.
TINY = ["data.num_images=64", "optim.batch_size=16", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off",
        "optim.warmup_epochs=0.25", "run.epochs=3", "run.log_every=2", "run.kernels=off"]


def env() -> dict[str, str]:
    """This interpreter's venv for the launch scripts, one thread per rank, no inherited rank variables,
    a rendezvous port of this test process's own."""
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FASTBYOL_VENV=sys.prefix)
    for name in [n for n in out if n.startswith("SLURM_")]:
        out.pop(name)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(name, None)
    out["MASTER_PORT"] = str(29700 + os.getpid() % 200)
    return out


def slurm_job_id() -> str:
    """A SLURM job id whose derived rendezvous port (10000 + id mod 20000) is this test process's own port."""
    return str(int(env()["MASTER_PORT"]) - 10000 + 40000)


def slurm_job_env(ntasks: int, bin_dir: Path | None = None) -> dict[str, str]:
    """``env()`` as a SLURM job of ``ntasks`` tasks on localhost sees it: no MASTER_PORT (the port comes from
    the job id), and with ``bin_dir`` the fake srun/scontrol first on PATH, scontrol logging to
    ``bin_dir/scontrol.log``."""
    base = env()
    del base["MASTER_PORT"]
    base.update(SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(ntasks), SLURM_JOB_NODELIST="localhost",
                SLURM_NODELIST="localhost", SLURM_JOB_ID=slurm_job_id())
    if bin_dir is not None:
        base.update(SCONTROL_LOG=str(bin_dir / "scontrol.log"), PATH=f"{bin_dir}:{base['PATH']}")
    return base


def slurm_tasks(args: list[str], cwd: Path, ntasks: int = 2, bin_dir: Path | None = None, **popen: Any
                ) -> list[subprocess.Popen[str]]:
    """``srun -n NTASKS fastbyol train ARGS`` on one host, as SLURM starts it: NTASKS plain processes that know
    their place only from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list (no torchrun variables;
    the port derived from SLURM_JOB_ID). ``bin_dir``: ``fake_slurm``'s stand-ins (a logging scontrol)."""
    base = slurm_job_env(ntasks, bin_dir)
    return [subprocess.Popen([sys.executable, "-m", "fastbyol", "train", *args], cwd=cwd,
                             env=dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)), text=True, **popen)
            for rank in range(ntasks)]


# Stand-ins for SLURM's commands on a machine without SLURM: srun starts SLURM_NTASKS copies of its command
# (options skipped) with their task variables and passes SIGTERM on to them; scontrol knows one host and logs
# requeues to $SCONTROL_LOG.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
  while :; do wait "$pid" && break; s=$?; kill -0 "$pid" 2>/dev/null || { rc=$s; break; }; done
done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$@" >> "$SCONTROL_LOG" ;;
esac
"""


def fake_slurm(bin_dir: Path) -> Path:
    """``srun`` and ``scontrol`` stand-ins in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def sbatch(template: str, args: list[str], bin_dir: Path, cwd: Path, ntasks: int, **extra: str
           ) -> subprocess.Popen[str]:
    """``sbatch scripts/slurm/<template> ARGS`` as SLURM runs it on one host: the batch script with the job's
    variables, the fake srun and scontrol first on PATH, the checkout as the submit directory."""
    base = dict(slurm_job_env(ntasks, bin_dir), SLURM_SUBMIT_DIR=str(REPO), **extra)
    return subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / template), *args], cwd=cwd, env=base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun(args: list[str]) -> list[str]:
    """The README's single-node launch script (torchrun --standalone, 2 ranks)."""
    return ["bash", str(REPO / "scripts" / "launch_torchrun.sh"), "2", *args]


def run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_same_training(a: dict[str, Any], b: dict[str, Any], atol: float, rtol: float,
                         momentum_atol: float | None = None) -> float:
    """Online, predictor and target parameters and BatchNorm statistics of two checkpoints, and their
    LARS momentum where both hold it (a DeepSpeed run keeps its own in DeepSpeed's shards; momentum is a
    sum of gradients: ``momentum_atol`` where those are the chaotic part). Returns the worst difference."""
    assert a["model"].keys() == b["model"].keys()
    worst = 0.0
    for name, x in a["model"].items():
        y = b["model"][name]
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max()))
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    if a["optimizer"] and b["optimizer"]:
        for k, state in a["optimizer"]["state"].items():
            torch.testing.assert_close(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"],
                                       atol=atol if momentum_atol is None else momentum_atol, rtol=rtol)
    return worst


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...), from /proc."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def kill_after_checkpoint(cmd: list[str], cwd: Path, run_dir: Path, step: int, final_step: int) -> None:
    """Start a job, SIGKILL its whole process tree (the launcher's group and every rank below it) once
    ``ckpt-<step>.pt`` exists, as a node failure would, and check the kill landed before the run's end (else
    nothing would be tested). A rank left running would still hold the run directory's lock, and the resume
    would rightly be refused."""
    from fastbyol.engine import checkpoint

    job = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    ckpt = run_dir / "checkpoints" / checkpoint.checkpoint_name(step)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = job.poll() is not None
    tree = descendants(job.pid)  # the ranks: torchrun starts each in a session of its own, out of the group
    os.killpg(job.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in tree):  # their locks go at exit
        assert time.monotonic() < deadline, f"ranks {tree} outlived SIGKILL"
        time.sleep(0.05)
    assert ckpt.exists(), f"the job never wrote its step-{step} checkpoint"
    steps = [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    assert not finished and final_step not in steps, "the job finished before it was killed: nothing was tested"
