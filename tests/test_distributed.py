"""Several ranks on gloo (CPU), started by the real launchers: they must train exactly like one process
with the same global batch, and a killed multi-rank run must resume where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fastbyol.config import build_config
from fastbyol.engine import checkpoint
from fastbyol.engine.trainer import start_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# ResNet-18 with the small stem on 16 px procedural images; a global batch of 16 = 2 ranks x 8.
TINY = ["data.num_images=64", "optim.batch_size=16", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off",
        "optim.warmup_epochs=0.25", "run.epochs=3", "run.log_every=2", "run.kernels=off"]
STEPS = 10
# The kernels (interpreted here) are compared over 4 steps: this tiny model is chaotic (BatchNorm over 8
# images of 2x2 pixels in layer4, zero-initialised residual gammas), and with the fused loss the 1e-6
# fp32 differences of summing over 2 x 8 instead of 16 images grow ~4x per step from step 3 (measured:
# 4e-6 at step 4 and 4e-5 in the momentum, 2e-4 at step 10; the reference path stays at 1.4e-6 over 10
# steps). A real error (a
# gradient not averaged, a view DDP does not write) is 1e-3 or more by step 1.
KERNEL_STEPS = 4


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FASTBYOL_VENV=sys.prefix)
    env.pop("WORLD_SIZE", None)
    return env


REPO = Path(__file__).resolve().parent.parent


def _torchrun(args: list[str]) -> list[str]:
    """The README's single-node launch script (torchrun, 2 ranks), with this interpreter's venv."""
    return ["bash", str(REPO / "scripts" / "launch_torchrun.sh"), "2", *args]


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _final(run_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    step, path = checkpoint.list_checkpoints(run_dir / "checkpoints")[0]
    assert step == steps
    return checkpoint.load(path)


def _assert_same_training(a: dict[str, Any], b: dict[str, Any], atol: float, rtol: float,
                          momentum_atol: float | None = None) -> None:
    """Online, predictor and target parameters, BatchNorm statistics, and LARS momentum (a sum of
    gradients: ``momentum_atol`` where they are the chaotic part)."""
    assert a["model"].keys() == b["model"].keys()
    worst = 0.0
    for name, x in a["model"].items():
        y = b["model"][name]
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max()))
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    for k, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"],
                                   atol=atol if momentum_atol is None else momentum_atol, rtol=rtol)
    print(f"worst parameter/statistic difference: {worst:.3g}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process with the global batch, and 2 DDP ranks with half of it each (both for STEPS steps)."""
    root = tmp_path_factory.mktemp("dist")
    single = start_run(build_config("smoke", overrides=[f"run.out_dir={root}", "run.name=single", *TINY,
                                                         f"run.max_steps={STEPS}", f"run.ckpt_every={STEPS}"]))
    assert single.ctx.world == 1 and single.ctx.engine == "single"
    single.train()
    single_kernels = start_run(build_config("smoke", overrides=[
        f"run.out_dir={root}", "run.name=single_kernels", *TINY, f"run.max_steps={KERNEL_STEPS}", "run.kernels=on"]))
    single_kernels.train()
    _run(_torchrun([f"run.out_dir={root}", "run.name=ddp", *TINY, f"run.max_steps={STEPS}",
                    f"run.ckpt_every={STEPS}", "--preset", "smoke"]), root)
    # The Triton path (interpreted here): FlatLARS's gradient views must receive DDP's averaged gradients.
    _run(_torchrun([f"run.out_dir={root}", "run.name=ddp_kernels", *TINY, f"run.max_steps={KERNEL_STEPS}",
                    "run.kernels=on", "--preset", "smoke"]), root)
    return {"single": root / "single", "ddp": root / "ddp", "single_kernels": root / "single_kernels",
            "ddp_kernels": root / "ddp_kernels", "root": root}


def test_ddp_two_ranks_equal_one_process_with_the_global_batch(runs: dict[str, Path]) -> None:
    """Cross-replica BatchNorm + all-reduced gradients + identical LARS and EMA on every rank: 10 steps of
    2 ranks x 8 images are one process's 10 steps of 16 images, up to fp32 rounding."""
    single, ddp = _final(runs["single"]), _final(runs["ddp"])
    assert single["position"] == ddp["position"] == STEPS * 16
    _assert_same_training(single, ddp, atol=2e-5, rtol=1e-4)
    # Rank 0 alone wrote the run directory: one metrics row per log interval, no duplicates.
    rows = [line for line in (runs["ddp"] / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == STEPS // 2


def test_ddp_with_the_flat_lars_ema_kernels_equals_one_process(runs: dict[str, Path]) -> None:
    """Same with run.kernels=on (fused loss, flat LARS+EMA), against one process on the same kernels: the
    flat kernel steps every rank from the averaged gradients DDP copies into FlatLARS's gradient views."""
    _assert_same_training(_final(runs["single_kernels"], KERNEL_STEPS), _final(runs["ddp_kernels"], KERNEL_STEPS),
                          atol=2e-5, rtol=1e-4, momentum_atol=2e-4)


def test_killed_two_rank_run_resumes_to_the_same_parameters(runs: dict[str, Path]) -> None:
    """SIGKILL the whole 2-rank job after its step-4 checkpoint, resume it with the launcher: the end
    state equals the uninterrupted 2-rank run's exactly (same ranks, same shards, same order of sums)."""
    root = runs["root"]
    args = [f"run.out_dir={root}", "run.name=killed", *TINY, f"run.max_steps={STEPS}", "run.ckpt_every=2",
            "run.keep_last=5", "--preset", "smoke"]
    job = subprocess.Popen(_torchrun(args), cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    ckpt = root / "killed" / "checkpoints" / checkpoint.checkpoint_name(4)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "the job never wrote its step-4 checkpoint"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    steps = [s for s, _ in checkpoint.list_checkpoints(root / "killed" / "checkpoints")]
    assert STEPS not in steps, "the job finished before it was killed: nothing was tested"
    _run(_torchrun(["--resume", str(root / "killed")]), root)
    _assert_same_training(_final(runs["ddp"]), _final(root / "killed"), atol=0.0, rtol=0.0)
