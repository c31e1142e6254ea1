#!/usr/bin/env bash
# The README's main job: set up, then the digits demo: build scikit-learn's handwritten digits as a JPEG
# folder, pretrain BYOL on it (GPU when one is visible, CPU otherwise), and print kNN and linear-probe
# accuracy of the BYOL encoder next to the same architecture at random initialisation.
# Extra arguments go to `fastbyol demo` (e.g. --out runs/demo2 run.epochs=4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gpu,dev
venv="${FASTBYOL_VENV:-.venv}"
"$venv/bin/fastbyol" doctor
exec "$venv/bin/fastbyol" demo "$@"
