#!/usr/bin/env bash
# Issue 4's GPU benchmarks on a machine with torch and triton already installed (the H100 benchmark
# machine: torch 2.11, no network): install fastbyol itself without dependencies into /tmp/site (its
# kernels/ directory is the package fastbyol.kernels only once installed), then run every script.
# Results land in benchmarks/results/ (or $BENCH_OUT). Extra arguments go to every script.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
py="${PYTHON:-python3}"
out="$(realpath -m "${BENCH_OUT:-benchmarks/results}")"
"$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site-fastbyol . \
    || { echo "bench_gpu.sh: could not install fastbyol without network (needs setuptools)" >&2; exit 1; }
# Run from outside the checkout: there ./fastbyol (without kernels/ mapped in) would shadow the install.
export PYTHONPATH="/tmp/site-fastbyol:$repo${PYTHONPATH:+:$PYTHONPATH}"
cd /tmp
"$py" -c "import torch, fastbyol.kernels.lars; assert torch.cuda.is_available(), 'no CUDA GPU visible'"
export PYTHONUNBUFFERED=1
for bench in ema loss ntxent lars step telemetry_cost; do
    echo "== bench_$bench"
    "$py" -m "benchmarks.bench_$bench" --device cuda --out "$out" "$@"
done
# Issue 7: the sweep of the real step (telemetry on/off interleaved: its overhead), then a short
# synthetic ResNet-50 run with the NVML sampler and a profiler window, and its report where matplotlib is.
echo "== fastbyol bench"
# Four cases (~1 min of compilation each for the compiled ones) keep this under the device's 10-minute call.
"$py" -m fastbyol bench --batch 256 --compile off,default --kernels off,on --steps 60 --rounds 4 --out "$out"
echo "== nonfinite_cost"
"$py" -m benchmarks.nonfinite_cost --device cuda --out "$out"
# Issue 9: BYOL and SimCLR side by side on this GPU (compiled, kernels on): img/s, MFU, peak memory.
echo "== fastbyol bench --method byol,simclr"
"$py" -m fastbyol bench --method byol,simclr --batch 256 --compile default --kernels on --steps 40 --rounds 1 \
    --telemetry off --out "$out/methods"
echo "== fastbyol train (telemetry, profile)"
runs="${BENCH_RUNS:-/tmp/fastbyol-runs}"
"$py" -m fastbyol train --preset synthetic-r50 --profile 40:45 run.max_steps=100 run.log_every=10 \
    run.out_dir="$runs" run.name=telemetry-r50 run.progress=off
cp "$runs/telemetry-r50/metrics.jsonl" "$out/$(date -u +%F)-gpu-telemetry-r50-metrics.jsonl"
cp "$runs/telemetry-r50/telemetry.json" "$out/$(date -u +%F)-gpu-telemetry-r50-telemetry.json"
if "$py" -c "import matplotlib" 2>/dev/null; then
    "$py" -m fastbyol report "$runs/telemetry-r50" --bench "$out"/*-bench.csv
else
    echo "bench_gpu.sh: matplotlib absent here: fastbyol report skipped (run it on the copied run directory)" >&2
fi
