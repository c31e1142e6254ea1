"""Fault injection (issue 8): a run SIGKILLed at random steps, and once in the middle of writing a checkpoint,
then resumed each time, ends bitwise equal to an uninterrupted run; SIGTERM/SIGINT stop after the step with
a checkpoint and exit 75; a second signal ends the process at once; timed checkpoints."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from fastbyol.config_parse import build_config
from fastbyol.engine import checkpoint
from fastbyol.engine.trainer import start_run
from fastbyol.telemetry.sinks import read_metrics

REPO = Path(__file__).resolve().parent.parent
# 16 steps of ResNet-18 (small stem) on 16 px procedural images, a checkpoint every 2 steps, a row every step.
TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off",
        "optim.warmup_epochs=0.25", "run.epochs=2", "run.ckpt_every=2", "run.log_every=1", "run.keep_last=3",
        "run.telemetry=off"]
FINAL = 16


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _train_cmd(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "fastbyol", "train", "--preset", "smoke", f"run.out_dir={out}", f"run.name={name}",
            *TINY]


def _resume_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fastbyol", "train", "--resume", str(run_dir)]


def _logged_step(run_dir: Path) -> int:
    try:
        rows = read_metrics(run_dir / "metrics.jsonl")
    except (FileNotFoundError, ValueError):  # not there yet, or a row half-written this instant
        return 0
    return rows[-1]["step"] if rows else 0


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(job: subprocess.Popen[str], run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while _logged_step(run_dir) < step:
        assert job.poll() is None, f"the run ended before step {step}: {job.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.05)


def _final_state(run_dir: Path) -> dict[str, Any]:
    steps = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert steps and steps[0][0] == FINAL, f"the run did not reach step {FINAL}: {steps}"
    return checkpoint.load(steps[0][1])


def _assert_bitwise(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, x in a["model"].items():
        assert x.equal(b["model"][name]), name
    for k, state in a["optimizer"]["state"].items():
        assert state["momentum_buffer"].equal(b["optimizer"]["state"][k]["momentum_buffer"]), k
    assert (a["step"], a["position"]) == (b["step"], b["position"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run, launched like the others (one thread: the same summation order as theirs)."""
    out = tmp_path_factory.mktemp("straight")
    done = subprocess.run(_train_cmd(out, "straight"), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"state": _final_state(out / "straight"), "rows": read_metrics(out / "straight" / "metrics.jsonl")}


# The checkpoint writer of a run that SIGKILLs itself halfway through writing its step-6 temp file.
KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from fastbyol.engine import checkpoint
    from fastbyol.cli import main

    def half_then_die(path, data):
        if Path(path).name == checkpoint.checkpoint_name(6):
            with open(str(path) + ".partial.tmp", "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, data)

    original = checkpoint.atomic_write_bytes
    checkpoint.atomic_write_bytes = half_then_die
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_killed_at_random_steps_and_mid_checkpoint_resumes_bitwise(straight: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    # 1) Killed while writing its step-6 checkpoint: the half-written temp file is left, ckpt-6.pt is not.
    done = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *_train_cmd(tmp_path, "killed")[3:]], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [4, 2]
    assert list((run_dir / "checkpoints").glob("*.tmp")), "the kill did not land inside the write"
    # 2) Resumed, then SIGKILLed again at random steps (a different step each round, anywhere in the step,
    # sometimes inside a checkpoint write), resumed each time, until the run ends.
    rng = random.Random(8)
    kills = sorted(rng.sample(range(6, FINAL - 1), 3))
    for step in kills:
        job = _start(_resume_cmd(run_dir))
        _wait_for_step(job, run_dir, step)
        time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        assert _logged_step(run_dir) < FINAL, "the run ended before the kill: nothing was tested"
    done = subprocess.run(_resume_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # The SIGKILLed run could not release its run directory's lock: the resume takes it over and says so.
    assert f"fastbyol: taking over the lock of {run_dir} left by pid {job.pid} on " in done.stderr
    _assert_bitwise(_final_state(run_dir), straight["state"])
    # Every logged row appears once and (timing aside) equals the uninterrupted run's.
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, FINAL + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight["rows"]]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGTERM, 2), (signal.SIGINT, 0)])
def test_signal_stops_after_the_step_with_a_checkpoint(straight: dict[str, Any], tmp_path: Path, sig: int,
                                                       workers: int) -> None:
    """The signal goes to the whole process group, as scancel and Ctrl-C send it: with DataLoader workers it
    kills them too, and the run still stops with its checkpoint (the same data either way: the stream is a
    function of the seed and the position, not of the workers)."""
    run_dir = tmp_path / "stopped"
    job = _start([*_train_cmd(tmp_path, "stopped"), f"data.workers={workers}"])
    _wait_for_step(job, run_dir, 3)
    os.killpg(job.pid, sig)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 75, err[-2000:]
    stopped_at = _logged_step(run_dir)
    assert 3 <= stopped_at < FINAL
    assert checkpoint.list_checkpoints(run_dir / "checkpoints")[0][0] == stopped_at  # written at the stop
    name = signal.Signals(sig).name
    assert f"fastbyol: {name}: finishing this step, then writing a checkpoint" in err
    assert f"fastbyol: stopped by {name} at step {stopped_at}/{FINAL}; checkpoint" in err
    assert f"--resume {run_dir}" in err
    done = subprocess.run(_resume_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_bitwise(_final_state(run_dir), straight["state"])


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os, signal, time
        from fastbyol.engine.preempt import StopRequest
        stop = StopRequest()
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        print("first signal only flagged", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("still alive")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM
    assert done.stdout == "first signal only flagged\n"


def test_timed_checkpoints(tmp_path: Path) -> None:
    """run.ckpt_minutes writes a checkpoint once that much wall time has passed since the last one."""
    now = [0.0]

    def clock() -> float:  # 20 s pass between two looks at the clock
        now[0] += 20.0
        return now[0]

    overrides = [f"run.out_dir={tmp_path}", "run.name=timed", *TINY, "run.ckpt_every=1000", "run.keep_last=20",
                 "run.max_steps=5", "run.ckpt_minutes=1"]
    trainer = start_run(build_config("smoke", overrides=overrides))
    trainer.clock = clock
    trainer.train()
    steps = sorted(s for s, _ in checkpoint.list_checkpoints(tmp_path / "timed" / "checkpoints"))
    # Start at 20 s; steps 1-3 look at 40, 60, 80 s: 60 s have passed at step 3; the save resets the clock (100 s);
    # step 4 looks at 120 s; step 5 is the end of the session (always saved).
    assert steps == [3, 5]


def test_resume_auto_starts_then_continues_and_refuses_other_math(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The same command line for every try of a requeued job."""
    from fastbyol.cli import main

    base = ["train", "--resume", "auto", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=job", *TINY]
    assert main([*base, "run.max_steps=2"]) == 0
    assert "--resume auto: " in (err := capsys.readouterr().err) and "no checkpoint yet: starting/16" in err
    assert main([*base, "run.max_steps=4"]) == 0  # a resumable key may differ: it takes the command's value
    assert "resuming at step 2/16" in capsys.readouterr().err
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "job" / "checkpoints")][0] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "job" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert main([*base, "optim.base_lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fastbyol: error: --resume auto: {tmp_path / 'job'} holds a run with optim.base_lr=")
    assert "use the run's settings, or another run.name" in err
    assert main([*base, "method=simclr"]) == 2  # a top-level key, compared like the sections' keys
    assert "holds a run with method='byol', but this command says 'simclr'" in capsys.readouterr().err
    assert main(["train", "--resume", "auto", "--preset", "smoke", f"run.out_dir={tmp_path}"]) == 2
    assert "--resume auto needs run.name=NAME" in capsys.readouterr().err
