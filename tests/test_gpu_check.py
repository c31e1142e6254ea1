"""scripts/gpu_check.sh --dry-run on this machine: every stage is listed in summary.md (the GPU ones skipped with
the reason), each printed command is the right one and parses with the real command line, the environment is
recorded, OUT_DIR holds no more files than the device tool brings back, and bad arguments are refused."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fastbyol.cli import _parser
from fastbyol.config_parse import build_config
from fastbyol.engine.bench import Sweep

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ["install", "environment", "cuda-tests", "bench-ema", "bench-lars", "bench-loss", "bench-ntxent",
          "step-eager", "step-compiled-kernels", "step-ro-kernels", "step-compiled", "telemetry-profile",
          "telemetry-report", "byol-vs-simclr", "step-vits16", "step-convnext-t"]
# What each step case of the sweep asks of `fastbyol bench` (run.compile, run.kernels).
STEP_CASES = {"step-eager": ("off", "off"), "step-compiled-kernels": ("default", "on"),
              "step-ro-kernels": ("reduce-overhead", "on"), "step-compiled": ("default", "off")}


def _run(*args: str, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    return subprocess.run(["bash", str(SCRIPT), *args, *([str(out)] if out else [])], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    return _run("--dry-run", out=out), out


def _commands(stdout: str) -> dict[str, list[str]]:
    """Stage name -> its printed command (the line after '== NAME [...]'), split as a shell would."""
    lines = stdout.splitlines()
    return {line.split()[1]: shlex.split(lines[i + 1]) for i, line in enumerate(lines) if line.startswith("== ")}


def test_dry_run_lists_every_stage_and_exits_0(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stderr + done.stdout[-3000:]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    assert done.stdout.rstrip().endswith(summary.rstrip())  # summary.md is printed last
    gpu_reason = "skipped: dry run" if torch.cuda.is_available() else "skipped: no CUDA GPU visible"
    for i, stage in enumerate(STAGES, 1):
        row = next((r for r in summary.splitlines() if r.startswith(f"| {i} | {stage} |")), None)
        assert row is not None, f"{stage} is not row {i} of summary.md's stages table"
        if stage == "install":
            assert "| skipped: dry run |" in row
        elif stage == "environment":
            assert "| ok |" in row, row  # the probe runs: it is how the script knows there is no GPU
        else:
            assert f"| {gpu_reason} |" in row, row
    assert f"- python: {sys.version.split()[0]}" in summary and f"- torch: {torch.__version__}" in summary
    assert "- TRITON_INTERPRET: 0" in summary  # the stages compile the kernels for the GPU
    # At most 8 files come back from the device machine: summary.md and the archive here.
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.md"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "files/stages.tsv" in names and "files/environment/environment.txt" in names


def test_dry_run_prints_the_right_commands(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = dry_run
    commands = _commands(done.stdout)
    assert list(commands) == STAGES
    files = out / "files"
    for stage, cmd in commands.items():
        assert cmd[0] == sys.executable, (stage, cmd)  # PYTHON, made absolute: the stages run elsewhere
    install = commands["install"]
    assert install[1:4] == ["-m", "pip", "install"] and {"--no-index", "--no-deps", "--target"} <= set(install)
    for path in (install[-1], install[install.index("--target") + 1]):  # a copy of the checkout, a temp site
        assert not Path(path).is_relative_to(REPO), path

    pytest_cmd = commands["cuda-tests"]
    assert pytest_cmd[1:4] == ["-m", "pytest", str(REPO / "tests")]
    assert pytest_cmd[pytest_cmd.index("-m", 2) + 1] == "cuda"
    assert f"--junitxml={files}/cuda-tests/cuda-tests.xml" in pytest_cmd
    assert "junit_logging=system-out" in pytest_cmd

    for name in ("ema", "lars", "loss", "ntxent"):
        assert commands[f"bench-{name}"][1:] == ["-m", f"benchmarks.bench_{name}", "--device", "cuda", "--out",
                                                 f"{files}/bench-{name}"]
        assert (REPO / "benchmarks" / f"bench_{name}.py").is_file()

    parser = _parser()
    for stage, (compile_mode, kernels) in STEP_CASES.items():
        cmd = commands[stage]
        assert cmd[1:4] == ["-m", "fastbyol", "bench"]
        args = parser.parse_args(cmd[3:])  # the real CLI: an unknown option would exit here
        assert (args.preset, args.batch, args.compile, args.kernels, args.device, args.out) == (
            "synthetic-r50", "256", compile_mode, kernels, "cuda", f"{files}/{stage}")
        Sweep(batch=[256], compile=[compile_mode], kernels=[kernels], telemetry=args.telemetry.split(","),
              steps=args.steps, warmup=args.warmup, rounds=args.rounds).validate()
    methods = parser.parse_args(commands["byol-vs-simclr"][3:])
    assert (methods.command, methods.method, methods.compile, methods.kernels) == ("bench", "byol,simclr",
                                                                                    "default", "on")

    for stage, arch in (("step-vits16", "timm:vit_small_patch16_224"), ("step-convnext-t", "timm:convnext_tiny")):
        args = parser.parse_args(commands[stage][3:])
        assert (args.compile, args.kernels, args.device, args.out) == ("default", "on", "cuda", f"{files}/{stage}")
        cfg = build_config(args.preset, overrides=args.overrides)  # the overrides make a valid run
        assert (cfg.model.arch, cfg.optim.name, cfg.data.image_size) == (arch, "adamw", 224)

    train = parser.parse_args(commands["telemetry-profile"][3:])
    assert (train.command, train.preset, train.profile) == ("train", "synthetic-r50", "30:32")
    cfg = build_config(train.preset, overrides=train.overrides)  # every key=value is a valid key and value
    assert cfg.run.max_steps == 40 and cfg.run.out_dir == f"{files}/telemetry-profile"
    report = parser.parse_args(commands["telemetry-report"][3:])
    assert report.command == "report" and report.run_dir == f"{files}/telemetry-profile/telemetry-r50"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert _run().returncode == 2
    assert _run("--fast", out=tmp_path / "a").returncode == 2
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.csv").write_text("x\n")
    done = _run("--dry-run", out=full)
    assert done.returncode == 2 and "not empty" in done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck here (apt-get install shellcheck)")
def test_shellcheck_clean() -> None:
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
