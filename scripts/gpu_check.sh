#!/usr/bin/env bash
# The GPU check (issue 15): one command for a lent GPU machine (one H100 or H200; Python 3.12, torch 2.11,
# triton 3.6, torchvision, matplotlib, nvidia-ml-py; no network, no DALI or DeepSpeed unless carried) that
# harvests every GPU figure and correctness check fastbyol has, in under 8 minutes, into one folder.
#
#   bash scripts/gpu_check.sh OUT_DIR             on the GPU machine (OUT_DIR new or empty)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR   anywhere: print every stage's command, run only the
#                                                 environment probe, write summary.md with the rest skipped
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: every stage, the packing and the
# summary end within it), GPU_CHECK_COMMIT (the commit to report where the copy has no .git).
#
# Exit status: 0 when every correctness stage ran and passed (and for a dry run), 1 when one failed, timed
# out or was left out for lack of time, 2 for bad arguments or no CUDA GPU visible.
#
# Stages, in order. Each runs under `timeout` (SIGINT at its cap, so pytest still writes its junit XML; SIGKILL
# 10 s later) from a scratch directory outside the checkout; a failed stage is recorded and the next one runs.
# One budget covers them all: a stage starts only if `need` seconds are left, and its cap is cut to what is
# left, so a slow compile cannot take the stages after it and the run ends inside the budget. Estimates are
# for an H100/H200 with a cold compile cache (a fresh machine's): ResNet-50 bf16 batch 256 compiles in ~1 min
# (BYOL's forward traces both towers on both views), a step takes ~0.3 s eager and ~0.2 s compiled.
#
#   stage                   kind    est   cap   need  what
#   install                 setup    10    90      -  fastbyol without network or deps into a temp site
#   environment             env       4    30      -  GPU, driver, CUDA, torch, triton, Python, commit
#   cuda-tests              check   130   200     60  pytest -m cuda: the kernels vs their references (~70
#                                                     Triton compiles), compiled and CUDA-graph steps vs eager
#                                                     (3 ResNet-18 compiles), DALI GPU decode (if carried)
#   bench-ema/-lars/-loss/-ntxent  check  12-15 each  45 each  20  kernel benchmarks (each checks the kernels
#                                                     against the reference before timing)
#   step-eager              figure   25    60     30  fastbyol bench, ResNet-50 224 px bf16, batch 256
#   step-compiled-kernels   figure   80   150     90  the production path; pays the cold compile
#   step-ro-kernels         figure   35   100     45  reduce-overhead (CUDA graphs): the same graph, cached
#   step-compiled           figure   45   100     50  kernels off: the backbone's Triton code is cached by now
#   telemetry-profile       figure   35    75     50  fastbyol train, synthetic-r50, 40 steps, NVML sampler
#                                                     and a 2-step profiler window (compile cached)
#   telemetry-report        figure    8    30     10  fastbyol report of that run (matplotlib)
#   byol-vs-simclr          figure   90   120    100  both methods side by side, compiled, kernels on
#   step-vits16/-convnext-t figure   90   120    100  ViT-S/16 (AdamW) and ConvNeXt-T (timm), 224 px, compiled,
#                                                     kernels on: img/s and MFU (need timm carried; cold compiles)
#                                                     (SimCLR's compile is cold: runs only if time is left)
#   Sum of the estimates: ~380 s to step-compiled, ~425 s with the telemetry run; byol-vs-simclr fits only
#   when the compiles ran faster than estimated. Dropped from the former bench_gpu.sh: bench_step (the step-*
#   stages run its cases), benchmarks.nonfinite_cost and benchmarks.telemetry_cost (host-side costs; no room).
#
# OUT_DIR ends with at most 8 files (what the device tool brings back): summary.md (printed last),
# cuda-tests.csv, the four kernel benchmarks' CSVs, step-sweep.csv (every fastbyol bench row), and
# gpu-check.tar.gz with everything else (logs, junit XML, markdown tables, the telemetry run and profile).
set -euo pipefail

usage="usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR"
dry_run=0
out=""
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 ($usage)" >&2; exit 2 ;;
        *)
            [[ -z "$out" ]] || { echo "gpu_check.sh: one OUT_DIR, got $out and $1 ($usage)" >&2; exit 2; }
            out="$1" ;;
    esac
    shift
done
[[ -n "$out" ]] || { echo "gpu_check.sh: no OUT_DIR ($usage)" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ -n "$(ls -A "$out")" ]]; then
    echo "gpu_check.sh: $out is not empty: give a new or empty folder" >&2
    exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
if [[ $py == */* ]]; then  # a relative path must survive the stages' cd
    py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
fi
budget="${GPU_CHECK_BUDGET_S:-450}"
grace=10                       # SIGKILL this long after a stage's SIGINT
deadline=$((budget - 15))      # every stage has ended by then (kill grace included); the rest packs and summarises
files="$out/files"             # every stage's output; packed into gpu-check.tar.gz at the end
logs="$files/logs"
mkdir -p "$logs"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastbyol-gpu-check.XXXXXX")"  # install target, caches, helpers, cwd
trap 'rm -rf "$work"' EXIT
site="$work/pkgs"
mkdir -p "$work/cwd"

# Stages run from the empty $work/cwd: there ./fastbyol (without kernels/ mapped in) cannot shadow the installed
# package, whose kernels/ directory is fastbyol.kernels only once installed. The checkout stays on the path
# (after it) for benchmarks/ and tests/.
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0   # tests/conftest.py sets 1 only where unset: the kernels compile for the GPU
export TORCHINDUCTOR_CACHE_DIR="$work/cache/inductor" TRITON_CACHE_DIR="$work/cache/triton"  # shared by the stages
export MPLBACKEND=Agg
export GPU_CHECK_COMMIT="${GPU_CHECK_COMMIT:-$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)}"

stages="$files/stages.tsv"
printf 'stage\tkind\tstatus\trc\tseconds\tcap_s\tcommand\n' >"$stages"
gpu=unknown     # yes / no: set by the environment stage
install_ok=1
skip_why=""     # set before a run_stage call: that stage is skipped with this reason
incomplete=()   # correctness stages that failed, timed out or were left out

# The command as one line a shell would read back (quoting only what needs it).
quote() {
    local arg line="" safe='^[A-Za-z0-9_./=:,@%+-]+$'
    for arg; do
        if [[ $arg =~ $safe ]]; then line+="$arg "; else line+="$(printf '%q' "$arg") "; fi
    done
    printf '%s' "${line% }"
}

# run_stage NAME KIND CAP NEED CMD...: KIND is setup, env, check (a failure fails the script) or figure.
run_stage() {
    local name=$1 kind=$2 cap=$3 need=$4
    shift 4
    local cmd status="" rc="" secs="" left limit t0
    cmd="$(quote "$@")"
    printf '== %s [%s, cap %ss]\n   %s\n' "$name" "$kind" "$cap" "$cmd"
    left=$((deadline - SECONDS - grace))
    limit=$((cap < left ? cap : left))
    local needs_gpu=0
    [[ $kind == check || $kind == figure ]] && needs_gpu=1
    if ((needs_gpu)) && [[ $gpu != yes ]]; then
        status="skipped: no CUDA GPU visible"
    elif ((dry_run)) && [[ $kind != env ]]; then
        status="skipped: dry run"
    elif ((!install_ok)) && [[ $kind != env ]]; then
        status="skipped: install failed"
    elif [[ -n $skip_why ]]; then
        status="skipped: $skip_why"
    elif ((limit < need || limit < 1)); then
        status="skipped: ${left}s of the budget left, needs ${need}s"
    else
        t0=$SECONDS
        rc=0
        (cd "$work/cwd" && exec timeout -s INT -k "$grace" "$limit" "$@") </dev/null >"$logs/$name.log" 2>&1 || rc=$?
        secs=$((SECONDS - t0))
        if ((rc == 0)); then
            status=ok
        elif ((rc == 124 || (rc == 137 && secs >= limit))); then
            status="timeout after ${limit}s"
        else
            status="failed (exit $rc)"
        fi
        [[ $status == ok ]] || tail -n 15 "$logs/$name.log" | sed 's/^/   | /'
    fi
    printf '   -> %s%s\n' "$status" "${secs:+ (${secs} s)}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$rc" "$secs" "$cap" "$cmd" >>"$stages"
    if [[ $kind == check || $kind == setup ]] && [[ $status != ok ]] && [[ $status != "skipped: dry run" ]] \
        && [[ $status != "skipped: no CUDA GPU visible" ]]; then
        incomplete+=("$name: $status")
    fi
    last_status=$status
    skip_why=""
}

# -- 1. install fastbyol (no network, no dependencies) and record the environment --------------------------
cat >"$work/gpu_check_environment.py" <<'EOF'
"""The machine and software, one key=value per line (stdout and environment.txt)."""
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "commit": os.environ.get("GPU_CHECK_COMMIT", "unknown"), "python": platform.python_version(),
       "platform": platform.platform(), "cpu_count": os.cpu_count()}
try:
    import torch

    env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                   capability="%d.%d" % (props.major, props.minor), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
except Exception as e:  # torch itself broken: say so, the stages after this one will too
    env["torch"], env["cuda_available"] = f"import failed: {e}", False
try:
    import pynvml

    pynvml.nvmlInit()
    driver = pynvml.nvmlSystemGetDriverVersion()
    env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
except Exception:
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.split("\n")[0] or "unknown"
    except Exception:
        env["driver"] = "unknown (no NVML, no nvidia-smi)"
for dist in ("triton", "torchvision", "timm", "numpy", "pillow", "pyyaml", "matplotlib", "nvidia-ml-py", "pytest",
             "nvidia-dali-cuda130", "deepspeed"):
    env[dist] = version(dist)
try:
    spec = importlib.util.find_spec("fastbyol.kernels")
    env["fastbyol_kernels"] = spec.origin if spec else "not importable (fastbyol not installed)"
except Exception as e:
    env["fastbyol_kernels"] = f"not importable: {e}"
env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
text = "".join(f"{k}={v}\n" for k, v in env.items())
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
(Path(sys.argv[1]) / "environment.txt").write_text(text)
sys.stdout.write(text)
EOF

mode=""
if ((dry_run)); then mode=", dry run"; fi
echo "gpu_check.sh: $repo -> $out (budget ${budget}s$mode)"
# pip builds in the source tree (build/, *.egg-info): build from a copy, so the checkout is left as it was.
src="$work/src"
if ((!dry_run)); then
    mkdir -p "$src"
    tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./runs --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
fi
run_stage install setup 90 1 \
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" "$src"
[[ $last_status == ok || $last_status == "skipped: dry run" ]] || install_ok=0
run_stage environment env 30 1 "$py" "$work/gpu_check_environment.py" "$files/environment"
if grep -qx 'cuda_available=True' "$files/environment/environment.txt" 2>/dev/null; then gpu=yes; else gpu=no; fi
sed 's/^/   /' "$files/environment/environment.txt" 2>/dev/null || true

# -- 2. correctness on the GPU: pytest -m cuda over the whole tests folder ------------------------------------
# --continue-on-collection-errors: a module that cannot be imported here is an error in the XML, not the end of
# the run. junit_logging=system-out keeps every test's printed MEASURED line, passing tests' too.
run_stage cuda-tests check 200 60 \
    "$py" -m pytest "$repo/tests" -m cuda -p no:cacheprovider --continue-on-collection-errors -q -rfEs \
    --durations=15 --basetemp="$work/pytest" --junitxml="$files/cuda-tests/cuda-tests.xml" \
    -o junit_logging=system-out -o junit_family=xunit2

# -- 3. kernel benchmarks (each compares its kernels with the reference before timing) -----------------------
for bench in ema lars loss ntxent; do
    run_stage "bench-$bench" check 45 20 "$py" -m "benchmarks.bench_$bench" --device cuda --out "$files/bench-$bench"
done

# -- 4. the training step: ResNet-50, 224 px, bf16, batch 256, one invocation per case ------------------------
# Warm-up 3: the compile, then (reduce-overhead) CUDA graphs' warm-up run and recording; every timed step is a
# replay. The production path (compiled + kernels) also alternates telemetry on/off blocks: its overhead.
step=(-m fastbyol bench --preset synthetic-r50 --batch 256 --warmup 3 --device cuda)
run_stage step-eager figure 60 30 "$py" "${step[@]}" --compile off --kernels off --telemetry off \
    --steps 20 --rounds 1 --out "$files/step-eager"
run_stage step-compiled-kernels figure 150 90 "$py" "${step[@]}" --compile default --kernels on --telemetry on,off \
    --steps 20 --rounds 2 --out "$files/step-compiled-kernels"
run_stage step-ro-kernels figure 100 45 "$py" "${step[@]}" --compile reduce-overhead --kernels on --telemetry off \
    --steps 20 --rounds 1 --out "$files/step-ro-kernels"
run_stage step-compiled figure 100 50 "$py" "${step[@]}" --compile default --kernels off --telemetry off \
    --steps 20 --rounds 1 --out "$files/step-compiled"

# -- 5. if time is left: a short real run with telemetry and a profile window; BYOL vs SimCLR -----------------
# The run's config is the sweep's compiled + kernels case (compile auto = default, kernels auto = on): its
# compiled graph is in the inductor cache by now.
run_stage telemetry-profile figure 75 50 "$py" -m fastbyol train --preset synthetic-r50 --profile 30:32 \
    run.max_steps=40 run.log_every=10 run.out_dir="$files/telemetry-profile" run.name=telemetry-r50 \
    run.progress=off
shopt -s nullglob
sweep_csvs=("$files"/step-*/*-bench.csv)
shopt -u nullglob
if [[ ! -f "$files/telemetry-profile/telemetry-r50/metrics.jsonl" ]]; then
    skip_why="no telemetry run to report on"
elif grep -qx 'matplotlib=absent' "$files/environment/environment.txt"; then
    skip_why="matplotlib absent"
fi
run_stage telemetry-report figure 30 10 "$py" -m fastbyol report "$files/telemetry-profile/telemetry-r50" \
    --out "$files/telemetry-report" ${sweep_csvs[@]+--bench "${sweep_csvs[@]}"}
run_stage byol-vs-simclr figure 120 100 "$py" -m fastbyol bench --preset synthetic-r50 --method byol,simclr \
    --batch 256 --compile default --kernels on --telemetry off --steps 20 --rounds 1 --warmup 3 --device cuda \
    --out "$files/byol-vs-simclr"
if grep -qx 'timm=absent' "$files/environment/environment.txt" 2>/dev/null; then
    skip_why="timm absent (carry its wheel and huggingface_hub's)"
fi
run_stage step-vits16 figure 120 100 "$py" -m fastbyol bench --preset synthetic-r50 --batch 256 --compile default \
    --kernels on --telemetry on --steps 20 --rounds 1 --warmup 3 --device cuda --out "$files/step-vits16" \
    model.arch=timm:vit_small_patch16_224 model.timm_kwargs.num_heads=12 optim.name=adamw
if grep -qx 'timm=absent' "$files/environment/environment.txt" 2>/dev/null; then
    skip_why="timm absent (carry its wheel and huggingface_hub's)"
fi
run_stage step-convnext-t figure 120 100 "$py" -m fastbyol bench --preset synthetic-r50 --batch 256 \
    --compile default --kernels on --telemetry on --steps 20 --rounds 1 --warmup 3 --device cuda \
    --out "$files/step-convnext-t" model.arch=timm:convnext_tiny optim.name=adamw

# -- 6. summary.md, the result CSVs at the top, everything else packed --------------------------------------
cat >"$work/gpu_check_summary.py" <<'EOF'
"""Collect the stages' outputs into OUT_DIR: cuda-tests.csv (from the junit XML), step-sweep.csv (every
fastbyol bench row), the kernel benchmarks' CSVs, gpu-check.tar.gz (the rest), and summary.md."""
import csv
import gzip
import math
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

out, dry_run, budget, elapsed = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
files = out / "files"
PACK = "gpu-check.tar.gz"
PACK_LIMIT = 15 << 20  # the device tool brings back files of 16 MiB at most
STEP_STAGES = ["step-eager", "step-compiled-kernels", "step-ro-kernels", "step-compiled", "byol-vs-simclr",
               "step-vits16", "step-convnext-t"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows):
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def fmt(value):
    """4 significant digits for numbers, the text itself otherwise (a table cell: '|' escaped)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value).replace("|", "\\|")
    if not math.isfinite(x):
        return str(value)
    return str(int(x)) if x == int(x) and abs(x) < 1e5 else f"{x:.4g}"


def table(rows, columns):
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


with open(files / "stages.tsv", newline="") as f:
    stages = list(csv.DictReader(f, delimiter="\t"))
env = {}
env_file = files / "environment" / "environment.txt"
if env_file.is_file():
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
top = {}  # stage -> files written at the top of OUT_DIR

# pytest's junit XML -> cuda-tests.csv: one row per test case (collection errors included).
tests = []
xml = files / "cuda-tests" / "cuda-tests.xml"
if xml.is_file():
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0][:300] if message else ""
                break
        if not case.get("name"):  # what pytest writes for the test its SIGINT (the stage's cap) stopped
            outcome, message = "interrupted", "stopped by the stage's time cap"
        stdout = case.findtext("system-out") or ""
        measured = [line[len("MEASURED "):] for line in stdout.splitlines() if line.startswith("MEASURED ")]
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": case.get("time", ""), "message": message, "measured": " | ".join(measured)})
    write_csv(out / "cuda-tests.csv", tests)
    top["cuda-tests"] = ["cuda-tests.csv"]

# Kernel benchmarks: their CSVs (named <date>-<device>-<subject>.csv) go to the top as they are.
bench = {}
for stage in ("bench-ema", "bench-lars", "bench-loss", "bench-ntxent"):
    for path in sorted((files / stage).glob("*.csv")):
        shutil.copy(path, out / path.name)
        top.setdefault(stage, []).append(path.name)
        bench[stage] = read_csv(path)

# Every fastbyol bench row (the four step cases, BYOL vs SimCLR) in one CSV, a column naming the stage.
sweep = []
for stage in STEP_STAGES:
    for path in sorted((files / stage).glob("*-bench.csv")):
        sweep += [{"case": stage, **row} for row in read_csv(path)]
if sweep:
    write_csv(out / "step-sweep.csv", sweep)
    for stage in {r["case"] for r in sweep}:
        top.setdefault(stage, []).append("step-sweep.csv")

# The telemetry run: keep metrics, telemetry, samples and the profile's summary; drop the checkpoint; the
# Chrome trace gzipped, if small enough to travel.
notes = []
run_dir = files / "telemetry-profile" / "telemetry-r50"
if run_dir.is_dir():
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for trace in sorted((run_dir / "profile").glob("*.json")):
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        if Path(f"{trace}.gz").stat().st_size > 8 << 20:
            notes.append(f"profile trace {trace.name}.gz left out: {Path(f'{trace}.gz').stat().st_size >> 20} MiB")
            Path(f"{trace}.gz").unlink()

# Pack files/ (largest files dropped first if the archive would not travel).
def pack(skip):
    with tarfile.open(out / PACK, "w:gz") as tar:
        for path in sorted(files.rglob("*")):
            if path.is_file() and path not in skip:
                tar.add(path, arcname=str(path.relative_to(out)))
    return (out / PACK).stat().st_size


skip = set()
by_size = sorted((p for p in files.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)
while pack(skip) > PACK_LIMIT and by_size:
    dropped = by_size.pop(0)
    skip.add(dropped)
    notes.append(f"{dropped.relative_to(out)} left out of {PACK}: {dropped.stat().st_size >> 20} MiB")

# summary.md
not_failures = ("ok", "skipped: dry run", "skipped: no CUDA GPU visible")
failed = [s for s in stages if s["kind"] in ("setup", "check") and s["status"] not in not_failures]
if dry_run:
    verdict = "DRY RUN: commands printed, nothing on the GPU ran"
elif env.get("cuda_available") != "True":
    verdict = "NOT RUN: no CUDA GPU visible"
elif failed:
    verdict = "FAIL: " + "; ".join(f"{s['stage']} {s['status']}" for s in failed)
else:
    verdict = "PASS: every correctness stage ran and passed"
lines = [f"# fastbyol GPU check: {env.get('gpu', 'no GPU')}, {env.get('date', '')[:10]}", "",
         f"**{verdict}**", "",
         f"commit {env.get('commit', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), "
         f"triton {env.get('triton', '?')}, Python {env.get('python', '?')}, driver {env.get('driver', '?')}; "
         f"{elapsed} s of a {budget} s budget.", "", "## Stages", "",
         "| # | stage | status | seconds | cap (s) | wrote |", "|---|---|---|---|---|---|"]
for i, s in enumerate(stages, 1):
    own = files / s["stage"]
    wrote = list(top.get(s["stage"], []))
    if own.is_dir():
        inner = sorted(str(p.relative_to(own)) for p in own.rglob("*") if p.is_file())
        wrote += [f"{PACK}: files/{s['stage']}/ ({len(inner)} files)"] if inner else []
    if (files / "logs" / f"{s['stage']}.log").is_file():
        wrote.append(f"{PACK}: files/logs/{s['stage']}.log")
    status = s["status"]
    rows = [r for r in sweep if r["case"] == s["stage"]]
    if status == "ok" and rows and all(r.get("status") != "ok" for r in rows):  # fastbyol bench skips a case
        status += f", but no case ran ({rows[0].get('status')})"
    lines.append(f"| {i} | {s['stage']} | {fmt(status)} | {s['seconds']} | {s['cap_s']} | {'; '.join(wrote)} |")

lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]

lines += ["", "## Correctness: pytest -m cuda", ""]
if tests:
    counts = defaultdict(int)
    for t in tests:
        counts[t["outcome"]] += 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " (cuda-tests.csv: every test, its "
                 "time and what it measured)")
    bad = [t for t in tests if t["outcome"] in ("failed", "error", "interrupted")]
    lines += [""] + [f"- {t['outcome']}: `{t['test']}`: {t['message']}" for t in bad[:20]]
    reasons = defaultdict(int)
    for t in tests:
        if t["outcome"] == "skipped":
            reasons[t["message"]] += 1
    lines += [f"- skipped {n}: {why}" for why, n in reasons.items()]
    # What the comparisons measured: the step and DALI comparisons as they are, the kernels' worst per family
    # and dtype.
    worst = defaultdict(dict)
    steps = []
    for t in tests:
        for m in filter(None, t["measured"].split(" | ")):
            check, _, values = m.partition(" ")
            pairs = dict(v.split("=", 1) for v in values.split() if "=" in v)
            if check.startswith(("step[", "dali_")):
                steps.append({"check": check, **pairs})
                continue
            family = check.split("[")[0]
            args = check.partition("[")[2].rstrip("]").split(",")
            dtype = next((a.removeprefix("torch.") for a in args if a.startswith("torch.")), "")
            for k, v in pairs.items():
                try:
                    worst[(family, dtype)][k] = max(worst[(family, dtype)].get(k, 0.0), float(v))
                except ValueError:  # a flag (True/False): "mixed" where the rows disagree
                    prev = worst[(family, dtype)].get(k)
                    worst[(family, dtype)][k] = v if prev in (None, v) else "mixed"
    if steps:
        lines += ["", "Training step against eager (worst relative difference over the steps), DALI against "
                  "torchvision:", ""] + table(steps, list(dict.fromkeys(k for r in steps for k in r)))
    if worst:
        lines += ["", "Kernels against their references, worst measured per kernel and dtype:", ""]
        rows = [{"kernel": f, "dtype": d, **v} for (f, d), v in sorted(worst.items())]
        lines += table(rows, list(dict.fromkeys(k for r in rows for k in r)))
else:
    lines.append("not run (see the stages table)")

lines += ["", "## Kernel benchmarks", ""]
columns = {"bench-ema": ["variant", "n_tensors", "median_ms", "p10_ms", "p90_ms", "gb_per_s", "pct_of_copy_bw",
                         "speedup_vs_loop"],
           "bench-lars": ["variant", "median_ms", "p10_ms", "p90_ms", "gb_per_s", "pct_of_copy_bw",
                          "speedup_vs_foreach", "speedup_fused_vs_unfused"],
           "bench-loss": ["variant", "B", "D", "dtype", "median_ms", "gb_per_s", "pct_of_copy_bw", "speedup_vs_ref"],
           "bench-ntxent": ["variant", "B", "D", "dtype", "median_ms", "tflop_per_s", "pct_of_matmul",
                            "speedup_vs_ref", "peak_mib"]}
for stage, cols in columns.items():
    if stage in bench:
        lines += [f"### {stage}", ""] + table(bench[stage], cols) + [""]
if not bench:
    lines.append("not run (see the stages table)")

lines += ["", "## Training step: ResNet-50, 224 px, bf16, batch 256 (synthetic data on the device)", ""]
if sweep:
    eager = next((float(r["median_ms"]) for r in sweep if r["case"] == "step-eager" and r.get("median_ms")), None)
    for r in sweep:
        if eager and r.get("median_ms"):
            r["speedup_vs_eager"] = eager / float(r["median_ms"])
    lines += table(sweep, ["case", "method", "compile_used", "kernels_used", "telemetry", "status", "median_ms",
                           "p10_ms", "p90_ms", "img_per_s", "tflop_per_s", "mfu_pct", "peak_mem_gib",
                           "speedup_vs_eager", "telemetry_overhead_pct", "gpu_power_w"])
    lines.append("")
    lines.append("(step-sweep.csv: every column, phase times and the environment of each row)")
else:
    lines.append("not run (see the stages table)")

metrics = run_dir / "metrics.jsonl"
if metrics.is_file():
    import json

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if rows:
        last = rows[-1]
        lines += ["", "## Telemetry run (fastbyol train --preset synthetic-r50, compiled + kernels, 40 steps)", "",
                  f"last row: step {last.get('step')}, img/s {fmt(last.get('img_per_s'))}, MFU % "
                  f"{fmt(last.get('mfu_pct'))}, peak GiB {fmt(last.get('peak_mem_gib'))}, phase ms "
                  f"{last.get('phase_ms')}; metrics, GPU samples and the profile of steps 30-31 in {PACK}"]
lines += ["", "## Notes", ""] + [f"- {n}" for n in notes or ["none"]]
lines += ["", "## Commands (run from a scratch folder, PYTHONPATH=<temp site>:<checkout>, TRITON_INTERPRET=0)", ""]
lines += [f"- {s['stage']}: `{s['command']}`" for s in stages]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF

"$py" "$work/gpu_check_summary.py" "$out" "$dry_run" "$budget" "$SECONDS" || echo "gpu_check.sh: the summary failed" >&2
if [[ -f "$out/gpu-check.tar.gz" ]]; then
    rm -rf "$files"
fi
echo
cat "$out/summary.md" 2>/dev/null || true
if ((dry_run)); then
    exit 0
fi
if [[ $gpu != yes ]]; then
    echo "gpu_check.sh: no CUDA GPU visible: nothing was checked" >&2
    exit 2
fi
if ((${#incomplete[@]})); then
    printf 'gpu_check.sh: correctness stage not passed: %s\n' "${incomplete[@]}" >&2
    exit 1
fi
exit 0
