#!/usr/bin/env bash
# Compile every captured Triton launch for sm_80..sm_120 under triton 3.6.0, the GPU machines' version (they have
# torch 2.11, triton 3.6.0, Python 3.12), beside the triton the venv has (3.8.0 with torch 2.14.1): triton 3.6.0 is
# installed once with pip --target into a side folder and put first on PYTHONPATH, so Triton is 3.6.0 while the
# launchers, torch and the rest are the venv's (torch only runs the launch code on CPU tensors here; the compile is
# Triton's alone). Arguments go to `python -m benchmarks.aot_compile` (e.g. --out DIR, --arch 90).
# tests/test_aot_compile.py runs it; run it by hand after any kernel change: bash scripts/aot_triton36.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTBYOL_VENV:-.venv}"
side="${TRITON36_DIR:-$venv/triton-3.6.0}"
if [ ! -f "$side/.installed" ]; then
  echo "aot_triton36: installing triton==3.6.0 into $side (one ~190 MB wheel, once)" >&2
  rm -rf "$side"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$side" triton==3.6.0; then
    echo "aot_triton36: pip install --target $side triton==3.6.0 failed: it needs PyPI (or a pip cache with the wheel)" >&2
    exit 1
  fi
  touch "$side/.installed"
fi
export PYTHONPATH="$side${PYTHONPATH:+:$PYTHONPATH}"
version="$(env -u TRITON_INTERPRET "$venv/bin/python" -c 'import triton; print(triton.__version__)')"
[ "$version" = "3.6.0" ] || { echo "aot_triton36: expected triton 3.6.0 from $side, got $version" >&2; exit 1; }
exec env -u TRITON_INTERPRET "$venv/bin/python" -m benchmarks.aot_compile --name aot-compile-triton36 "$@"
