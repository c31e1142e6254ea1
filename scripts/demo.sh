#!/usr/bin/env bash
# The README's main job: set up, then pretrain BYOL on the embedded default (the smoke preset: ResNet-18
# on procedurally drawn images, no download). Uses the GPU when one is visible, the CPU otherwise.
# Extra arguments go to `fastbyol train` (e.g. run.max_steps=4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gpu,dev
venv="${FASTBYOL_VENV:-.venv}"
"$venv/bin/fastbyol" doctor
exec "$venv/bin/fastbyol" train --preset smoke "$@"
