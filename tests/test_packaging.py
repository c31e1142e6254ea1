"""A non-editable install (a wheel, ``pip install .``, ``pip install --target``) holds the whole package.

pyproject.toml once listed the packages by hand and the wheel shipped without fastbyol.eval: the editable install
of the checkout hid it. Here the wheel is built from a copy of the checkout, installed with ``pip install --target``
and used from a process that cannot see the checkout: the wheel's files, an import of every module of the installed
package, and ``python -m fastbyol eval|export|demo --help``. No network: --no-deps, --no-build-isolation, --no-index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run first in every child process. An editable install of the checkout (scripts/setup.sh makes one) puts a finder on
# sys.meta_path from a .pth in site-packages; it would serve a module the wheel lacks from the checkout and hide the
# gap, so it goes. Then: the checkout is not on sys.path and fastbyol comes from the target folder.
PRELUDE = """
import sys
from pathlib import Path
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
_target, _repo = Path(sys.argv.pop(1)).resolve(), Path(sys.argv.pop(1)).resolve()
for _p in sys.path:  # (the venv's site-packages may sit inside the checkout, in .venv/)
    assert Path(_p or ".").resolve() not in (_repo, _repo / "fastbyol", _repo / "kernels"), f"checkout on path: {_p!r}"
import fastbyol
assert _target in Path(fastbyol.__file__).resolve().parents, f"fastbyol from {fastbyol.__file__}, not {_target}"
"""

WALK = PRELUDE + """
import importlib, json, pkgutil

def _reraise(name):
    raise  # walk_packages calls this inside its `except ImportError`: fail on the import error itself

names = ["fastbyol"]
for info in pkgutil.walk_packages(fastbyol.__path__, "fastbyol.", onerror=_reraise):
    if not info.name.endswith(".__main__"):  # __main__ runs the command line; run_module covers it below
        importlib.import_module(info.name)
        names.append(info.name)
for name, mod in sorted(sys.modules.items()):
    if name == "fastbyol" or name.startswith("fastbyol."):
        assert _target in Path(mod.__file__).resolve().parents, f"{name} from {mod.__file__}, not {_target}"
print(json.dumps({"modules": names, "gpu_extras_imported": sorted(
    m for m in sys.modules if m == "deepspeed" or m.startswith(("deepspeed.", "nvidia.dali")))}))
"""

# `python -m fastbyol ARGS` after the prelude: runpy is what -m uses.
RUN_MAIN = PRELUDE + """
import runpy
runpy.run_module("fastbyol", run_name="__main__", alter_sys=True)
"""


def _source_files(dst: Path) -> None:
    """The checkout's files that git would commit (tracked, plus untracked not ignored) copied to dst, so the build
    leaves no build/ or *.egg-info in the checkout; without git, the tree minus the usual litter."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", ".*_cache"), dirs_exist_ok=True)
        return
    for rel in out.decode().split("\0"):
        src = REPO / rel
        if rel and src.is_file():  # a tracked file deleted in the working tree is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(target), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", TRITON_INTERPRET="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(wheel, target folder it is installed in, a working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("packaging")
    src, dist, target, cwd = root / "src", root / "dist", root / "site", root / "cwd"
    for d in (src, dist, cwd):
        d.mkdir()
    _source_files(src)
    env = _env(target)
    del env["PYTHONPATH"]

    def pip(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "pip", *args, "-q"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"pip {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"

    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src))
    wheel = next(dist.glob("fastbyol-*.whl"))
    pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    return wheel, target, cwd


def test_wheel_holds_every_package_and_nothing_else(installed: tuple[Path, Path, Path]) -> None:
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for must in ("fastbyol/__init__.py", "fastbyol/__main__.py", "fastbyol/eval/__init__.py",
                 "fastbyol/eval/knn.py", "fastbyol/kernels/__init__.py", "fastbyol/kernels/lars.py"):
        assert must in names, f"{must} missing from {wheel.name}"
    tops = {n.split("/", 1)[0] for n in names}
    assert all(t == "fastbyol" or t.endswith(".dist-info") for t in tops), f"top-level entries: {sorted(tops)}"
    for stray in ("kernels", "tests", "benchmarks", "scripts"):
        assert stray not in tops, f"top-level {stray}/ in {wheel.name}"
    # Every .py of the checkout's fastbyol/ and kernels/ (as fastbyol/kernels/) is in the wheel.
    expected = {f"fastbyol/{p.relative_to(REPO / 'fastbyol').as_posix()}" for p in (REPO / "fastbyol").rglob("*.py")}
    expected |= {f"fastbyol/kernels/{p.relative_to(REPO / 'kernels').as_posix()}"
                 for p in (REPO / "kernels").rglob("*.py")}
    assert not expected - names, f"missing from {wheel.name}: {sorted(expected - names)}"


def test_installed_package_imports_every_module(installed: tuple[Path, Path, Path]) -> None:
    _, target, cwd = installed
    proc = subprocess.run([sys.executable, "-c", WALK, str(target), str(REPO)], cwd=cwd, env=_env(target),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = set(result["modules"])
    # Walking the installed package finds what the wheel has; compare with every module of the checkout.
    expected = {"fastbyol." + ".".join(p.relative_to(REPO / "fastbyol").with_suffix("").parts)
                for p in (REPO / "fastbyol").rglob("*.py")}
    expected |= {"fastbyol.kernels." + ".".join(p.relative_to(REPO / "kernels").with_suffix("").parts)
                 for p in (REPO / "kernels").rglob("*.py")}
    expected = {m.removesuffix(".__init__") for m in expected} - {"fastbyol.__main__"}
    assert not expected - imported, f"not importable from the installed package: {sorted(expected - imported)}"
    assert {"fastbyol.eval.knn", "fastbyol.kernels.lars", "fastbyol.engine.evaluate"} <= imported
    # deepspeed and nvidia.dali (the [gpu] extra) are imported inside the functions that use them, so a plain
    # install without the extra imports every module; here they are installed, and still must not be pulled in.
    assert result["gpu_extras_imported"] == [], result["gpu_extras_imported"]


@pytest.mark.parametrize("command", ["eval", "export", "demo"])
def test_installed_command_help(installed: tuple[Path, Path, Path], command: str) -> None:
    _, target, cwd = installed
    proc = subprocess.run([sys.executable, "-c", RUN_MAIN, str(target), str(REPO), command, "--help"], cwd=cwd,
                          env=_env(target), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith(f"usage: fastbyol {command}"), proc.stdout[:500]
