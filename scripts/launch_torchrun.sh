#!/usr/bin/env bash
# One node, several GPUs (or CPU ranks on gloo): DDP with cross-replica BatchNorm, one process per GPU.
#   bash scripts/launch_torchrun.sh NPROC [fastbyol train arguments...]
#   bash scripts/launch_torchrun.sh 8 --preset byol-r50-300ep data.path=/data/imagenet/train run.name=r50
# optim.batch_size is the global batch: it must split into NPROC x optim.accum_steps equal parts.
# Resume a run the same way: bash scripts/launch_torchrun.sh 8 --resume runs/r50
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${1:?usage: launch_torchrun.sh NPROC [fastbyol train arguments...]}"
shift
venv="${FASTBYOL_VENV:-.venv}"
python="$venv/bin/python"
[ -x "$python" ] || { echo "launch_torchrun.sh: no $python: run bash scripts/setup.sh first (or set FASTBYOL_VENV)" >&2; exit 2; }
exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fastbyol train "$@"
