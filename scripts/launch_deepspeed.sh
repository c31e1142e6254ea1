#!/usr/bin/env bash
# Several nodes: DeepSpeed ZeRO (stage 0, 1, 2 or 3) over the hosts of a DeepSpeed hostfile.
#   bash scripts/launch_deepspeed.sh HOSTFILE STAGE [fastbyol train arguments...]
#   bash scripts/launch_deepspeed.sh local:N STAGE [...]    (this machine only, N processes: no ssh)
#   bash scripts/launch_deepspeed.sh scripts/hostfile.example 2 --preset byol-r50-300ep \
#        data.path=/data/imagenet/train run.name=r50-zero2 run.out_dir=/shared/runs
# Every host needs the same checkout and venv at the same path, passwordless ssh from this one (the
# launcher uses pdsh or ssh), the data and run.out_dir on a shared file system (rank 0 writes the
# fastbyol checkpoint, every rank its DeepSpeed shard). MASTER_PORT picks the rendezvous port (29500).
# Resume: bash scripts/launch_deepspeed.sh HOSTFILE STAGE --resume /shared/runs/r50-zero2
set -euo pipefail
cd "$(dirname "$0")/.."
hostfile="${1:?usage: launch_deepspeed.sh HOSTFILE STAGE [fastbyol train arguments...]}"
stage="${2:?usage: launch_deepspeed.sh HOSTFILE STAGE [fastbyol train arguments...]}"
shift 2
if [[ "$hostfile" == local:* ]]; then
  where=(--num_gpus "${hostfile#local:}")  # on a CPU-only machine: that many CPU ranks on gloo
else
  [ -f "$hostfile" ] || { echo "launch_deepspeed.sh: hostfile $hostfile not found: copy scripts/hostfile.example and list your nodes, or use local:N" >&2; exit 2; }
  where=(--hostfile "$hostfile")
fi
case "$stage" in 0|1|2|3) ;; *) echo "launch_deepspeed.sh: STAGE=$stage: use 0, 1, 2 or 3" >&2; exit 2;; esac
venv="${FASTBYOL_VENV:-.venv}"
[ -x "$venv/bin/deepspeed" ] || { echo "launch_deepspeed.sh: no $venv/bin/deepspeed: pip install 'fastbyol[gpu]' into $venv" >&2; exit 2; }
engine=(run.engine=deepspeed "run.zero_stage=$stage")
for arg in "$@"; do [ "$arg" = "--resume" ] && engine=(); done  # a resumed run keeps its own engine
export PATH="$PWD/$venv/bin:$PATH"  # the launcher starts "python" on every host
exec "$venv/bin/deepspeed" "${where[@]}" --master_port "${MASTER_PORT:-29500}" --module fastbyol train "$@" "${engine[@]}"
