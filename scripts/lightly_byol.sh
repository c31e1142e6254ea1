#!/usr/bin/env bash
# Train lightly's BYOL (a public implementation, PyPI lightly==1.6.0) on fastbyol's data and network, for the
# learning-curve comparison: benchmarks/public_byol.py says which lightly settings it uses and why. lightly 1.6.0
# is installed once with pip --target --no-deps into a side folder and put first on PYTHONPATH, beside the venv's
# torch and torchvision (never resolved, never upgraded: lightly's requirements would pull a new torch), with the
# one pure-Python module its transforms import that the venv lacks (lightning-utilities; lightly's other
# requirements, hydra-core and pytorch_lightning, are not imported by the pieces the benchmark uses). Arguments go
# to `python -m benchmarks.public_byol`, e.g.:
#   bash scripts/lightly_byol.sh --data /tmp/shapes --out runs/lightly-byol-shapes --epochs 200 --batch-size 64
# Rerun the same command to resume a stopped run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTBYOL_VENV:-.venv}"
side="${LIGHTLY160_DIR:-$venv/lightly-1.6.0}"
packages=(lightly==1.6.0 lightning-utilities==0.15.3)
[ -x "$venv/bin/python" ] || { echo "lightly_byol: no $venv/bin/python: run bash scripts/setup.sh first" >&2; exit 1; }
if [ ! -f "$side/.installed" ]; then
  echo "lightly_byol: installing ${packages[*]} into $side (no dependencies, once)" >&2
  rm -rf "$side"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$side" "${packages[@]}"; then
    echo "lightly_byol: pip install --target $side ${packages[*]} failed: it needs PyPI (or a pip cache with the" \
      "wheels)" >&2
    exit 1
  fi
  printf '%s\n' "${packages[@]}" >"$side/.installed"
fi
export PYTHONPATH="$side${PYTHONPATH:+:$PYTHONPATH}"
version="$("$venv/bin/python" -c 'import lightly; print(lightly.__version__)')"
[ "$version" = "1.6.0" ] || { echo "lightly_byol: expected lightly 1.6.0 from $side, got $version" >&2; exit 1; }
exec "$venv/bin/python" -m benchmarks.public_byol "$@"
