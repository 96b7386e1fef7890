#!/usr/bin/env bash
# Single-node multi-process training with torchrun (one process per GPU; on a CPU box,
# processes are ranks on the gloo backend).
#   NPROC=8 bash launch/torchrun.sh --config configs/sd21.yaml --out runs/sd21 student.pretrained=/models/sd21
# A rank that dies (kill -9, out of memory) stops the group; torchrun starts it again, up
# to MAX_RESTARTS times (default 3), and every start passes --resume auto: it continues
# from the last whole checkpoint, or starts when there is none.
# Relative paths in the arguments are relative to the directory you run this from.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/python.sh
source "$REPO/launch/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# torchrun shares its rendezvous store with the workers; after a restart the new workers
# then read the dead ones' addresses and fail to connect (measured with torch 2.13, gloo;
# pytorch/pytorch#135712). A store of its own per restart avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-3}" -m prd train --resume auto "$@"
