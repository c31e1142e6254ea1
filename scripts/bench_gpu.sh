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
for bench in ema loss lars step; do
    echo "== bench_$bench"
    "$py" -m "benchmarks.bench_$bench" --device cuda --out "$out" "$@"
done
