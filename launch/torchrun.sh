#!/usr/bin/env bash
# Single-node multi-process training with torchrun (one process per GPU; on a CPU box,
# processes are ranks on the gloo backend).
#   NPROC=8 bash launch/torchrun.sh --config configs/sd21.yaml --out runs/sd21 student.pretrained=/models/sd21
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m prd train "$@"
