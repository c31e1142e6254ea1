"""Cluster launch (issue 19), the parts that need no second rank: where a process learns its rank (torchrun,
SLURM, other launchers refused), SLURM host lists, the requeue after SLURM's SIGUSR1, and the run directory's
lock (a second writer refused with one line, a lock left by a killed process taken over)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastbyol.engine import checkpoint, preempt
from fastbyol.engine.distributed import Launch, first_host, launch_env, slurm_port
from fastbyol.engine.runlock import LOCK_NAME, RunLock
from fastbyol.errors import FastByolError
from fastbyol.telemetry.sinks import read_metrics

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_NODELIST",
               "SLURM_STEP_NODELIST", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
               "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("nodelist", "host"), [
    ("localhost", "localhost"), ("gpu07", "gpu07"), ("gpu[07-09,12]", "gpu07"), ("gpu[12,07-09]", "gpu12"),
    ("node[001-004],login1", "node001"), ("a1,b[2-3]", "a1"), ("rack[3-4]-n[1-2]", "rack3-n1"),
    (" nid[0040] ", "nid0040"),
])
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    """The first name ``scontrol show hostnames`` prints (zero padding kept)."""
    assert first_host(nodelist) == host


def test_empty_node_list_says_what_to_set() -> None:
    with pytest.raises(FastByolError, match="MASTER_ADDR"):
        first_host("")


def test_no_launcher_is_one_process(clean_env: pytest.MonkeyPatch) -> None:
    assert launch_env() == Launch("none")


def test_slurm_tasks_give_rank_world_and_master(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NODELIST", "gpu[03-06]")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    assert launch_env() == Launch("slurm", 5, 8, 1, "gpu03", 10000 + 123456 % 20000)
    # A job step (srun -n 4 inside an allocation of 8 tasks) counts its own tasks and nodes; MASTER_* win.
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    clean_env.setenv("SLURM_STEP_NODELIST", "gpu[05-06]")
    clean_env.setenv("MASTER_PORT", "40000")
    assert launch_env() == Launch("slurm", 5, 4, 1, "gpu05", 40000)
    clean_env.setenv("MASTER_ADDR", "10.0.0.9")
    assert launch_env().master_addr == "10.0.0.9"


def test_torchrun_variables_win_over_slurm(clean_env: pytest.MonkeyPatch) -> None:
    """torchrun under srun (one task per node): torchrun's own worker variables describe the process."""
    for name, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-2]", "WORLD_SIZE": "16",
                        "RANK": "9", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}.items():
        clean_env.setenv(name, value)
    assert launch_env() == Launch("torchrun", 9, 16, 1, "n1", 29400)


def test_world_size_one_under_several_slurm_tasks_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    """An sbatch script that exports WORLD_SIZE=1 before ``srun -n 8``: eight rank-0s of one."""
    for name, value in {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n1", "WORLD_SIZE": "1"}.items():
        clean_env.setenv(name, value)
    with pytest.raises(FastByolError, match="WORLD_SIZE=1 but SLURM started 8 tasks"):
        launch_env()


def test_one_slurm_task_is_one_process(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_JOB_ID", "7")
    assert launch_env() == Launch("none")


@pytest.mark.parametrize("name", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_other_launchers_tasks_are_refused_before_any_write(clean_env: pytest.MonkeyPatch, name: str) -> None:
    """mpirun -n 4 fastbyol train: four processes that would each be rank 0 of 1."""
    clean_env.setenv(name, "4")
    with pytest.raises(FastByolError, match=f"{name}=4: .*launch with torchrun, srun"):
        launch_env()


def test_a_bad_slurm_variable_is_one_line(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLURM_PROCID", "x")
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_NODELIST", "n1")
    with pytest.raises(FastByolError, match="SLURM_PROCID='x' is not an integer"):
        launch_env()


def test_slurm_port_is_the_same_for_every_task_and_in_range() -> None:
    ports = {slurm_port(str(job)) for job in range(0, 200000, 997)}
    assert min(ports) >= 10000 and max(ports) < 30000
    assert slurm_port("4242") == slurm_port("4242") == 14242
    assert slurm_port("") == 29500


def _fake_scontrol(tmp_path: Path, code: int) -> Path:
    """An ``scontrol`` that records its arguments and exits ``code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\necho 'Invalid job id' >&2\n"
                      f"exit {code}\n")
    script.chmod(0o755)
    return bin_dir


def test_requeue_calls_scontrol_for_the_job_or_says_why_not(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert preempt.requeue() == (False, "not a SLURM job, so not requeued")
    clean_env.setenv("SLURM_JOB_ID", "5150")
    clean_env.setenv("PATH", str(tmp_path / "nowhere"))
    assert preempt.requeue() == (False, "scontrol not found, so SLURM job 5150 was not requeued")
    clean_env.setenv("PATH", str(_fake_scontrol(tmp_path, 0)))
    assert preempt.requeue() == (True, "SLURM job 5150 requeued: it continues from this checkpoint with --resume auto")
    clean_env.setenv("SLURM_ARRAY_JOB_ID", "5149")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert preempt.requeue()[0]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 5150\nrequeue 5149_3\n"
    clean_env.setenv("PATH", str(_fake_scontrol(tmp_path, 1)))
    assert preempt.requeue() == (False, "scontrol requeue 5149_3 failed (Invalid job id)")


# -- the run directory's lock --------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fastbyol.engine.runlock import RunLock
    lock = RunLock.acquire(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(120)
""")


def _hold(run_dir: Path) -> subprocess.Popen[str]:
    job = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert job.stdout is not None and job.stdout.readline() == "held\n"
    return job


def test_a_held_lock_refuses_a_second_writer_and_a_dead_holders_lock_is_taken_over(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = _hold(tmp_path)
    try:
        with pytest.raises(FastByolError, match=rf"run directory {tmp_path} is in use by pid {holder.pid} on "
                                                rf"{os.uname().nodename} \(since .*\): wait for that run"):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (tmp_path / LOCK_NAME).read_text()  # the killed holder could not clean up
    lock = RunLock.acquire(tmp_path)
    assert f"taking over the lock of {tmp_path} left by pid {holder.pid}" in capsys.readouterr().err
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: no holder, nothing to take over next time
    RunLock.acquire(tmp_path).release()
    assert capsys.readouterr().err == ""


def test_without_file_system_locks_the_holders_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where lockf fails with ENOLCK (a file system mounted without locks): a live holder on this host is
    refused, a dead one taken over, one on another host refused with the way out."""
    import errno
    import fcntl

    def no_locks(fd: int, cmd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    holder = _hold(tmp_path)
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    try:
        with pytest.raises(FastByolError, match=f"in use by pid {holder.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock.acquire(tmp_path).release()
    (tmp_path / LOCK_NAME).write_text('{"host": "elsewhere", "pid": 1, "started": 0}\n')
    with pytest.raises(FastByolError, match=f"no locks to tell whether it still runs: if it does not, delete "
                                            f"{tmp_path / LOCK_NAME}"):
        RunLock.acquire(tmp_path)


# 40 steps of a 16 px ResNet-18, one row per step and one checkpoint at the end.
TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off", "run.epochs=5",
        "run.log_every=1", "run.ckpt_every=1000", "run.telemetry=off"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in LAUNCH_VARS:
        env.pop(name, None)
    return env


@pytest.mark.slow
def test_a_second_train_on_the_same_run_directory_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fastbyol", "train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=one",
           *TINY]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "one"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the first run never logged a row"
        time.sleep(0.1)
    config = (run_dir / "config.yaml").read_bytes()
    second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1, second.stderr  # one line
    assert second.stderr.startswith(f"fastbyol: error: run directory {run_dir} is in use by pid {first.pid} on ")
    assert first.poll() is None, "the first run ended before the second started: nothing was tested"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    # Nothing of the first run's was touched: its config, one row per step, its final checkpoint loads.
    assert (run_dir / "config.yaml").read_bytes() == config
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 41))
    (step, path), = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert step == 40 and checkpoint.load(path)["step"] == 40
    assert (run_dir / LOCK_NAME).read_text() == ""  # released at the end


def test_doctor_says_where_the_process_sits(clean_env: pytest.MonkeyPatch) -> None:
    from fastbyol.engine.doctor import _launch

    assert _launch() == "one process (no torchrun or SLURM task variables)"
    for name, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODELIST": "g[1-2]",
                        "SLURM_JOB_ID": "77"}.items():
        clean_env.setenv(name, value)
    assert _launch() == "slurm: rank 1 of 2, local rank 1, master g1:10077"
    clean_env.setenv("PMI_SIZE", "2")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert _launch().startswith("refused: PMI_SIZE=2: this process was started as one of several tasks")
