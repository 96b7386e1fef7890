#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (see hostfile.example).
#   HOSTFILE=launch/hostfile bash launch/deepspeed.sh --config configs/sd21.yaml --out runs/sd21 ...
# The run folder must be on storage every node sees (checkpoints are written by all ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${HOSTFILE:-launch/hostfile}"
if [ ! -f "$HOSTFILE" ]; then
  echo "launch/deepspeed.sh: hostfile $HOSTFILE not found (copy launch/hostfile.example)" >&2
  exit 2
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment, not a --local_rank flag
exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --module prd.cli train "$@"
