#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (see hostfile.example).
#   HOSTFILE=launch/hostfile bash launch/deepspeed.sh --config configs/sd21.yaml --out /shared/runs/sd21 ...
# What the launcher needs on the cluster:
# - pdsh on this machine (its default launcher), and passwordless ssh from here to every
#   host of the hostfile (`ssh node-002 true` must work without a prompt);
# - the same Python environment at the same path on every node, and this checkout at the
#   same path (or the project installed there);
# - a `.deepspeed_env` file in your home folder or in the directory you launch from, one
#   NAME=value a line: the launcher exports those variables on every node (e.g.
#   NCCL_SOCKET_IFNAME=eth0, PYTHONPATH=/path/to/checkout, TORCH_EXTENSIONS_DIR=...);
#   variables starting with PYTHON, NCCL, UCX are exported without it;
# - the run folder (--out) on storage that every node sees: all ranks write checkpoints.
# The deepspeed launcher does not restart dead ranks: run it again (with --resume auto,
# passed here) or use torchrun.sh / slurm.sbatch, which restart the group themselves.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/python.sh
source "$REPO/launch/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
HOSTFILE="${HOSTFILE:-$REPO/launch/hostfile}"
if [ ! -f "$HOSTFILE" ]; then
  echo "launch/deepspeed.sh: hostfile $HOSTFILE not found (copy launch/hostfile.example)" >&2
  exit 2
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment, not a --local_rank flag
exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_local_rank \
  --module prd.cli train --resume auto "$@"
