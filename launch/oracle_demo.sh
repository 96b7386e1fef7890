#!/usr/bin/env bash
# The embedded default run:
#   1. pretrain the tiny SD in code (the stand-in for SD 2.1's weights), once: runs/tiny_base
#   2. distill the tiny student from the oracle teachers on the 30 training scenes, with
#      one DeepSpeed rank per core (NPROC, default 2; gloo on CPU)
#   3. sample the 6 held-out and 6 training prompts to GLB and score every mesh against
#      its analytic scene
#   bash launch/oracle_demo.sh [RUN_DIR]      (default runs/oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/python.sh
source launch/python.sh
RUN="${1:-runs/oracle}"
BASE=runs/tiny_base  # configs/oracle.yaml's student.pretrained
NPROC="${NPROC:-2}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

if [ ! -d "$BASE" ]; then
  # written under another name and renamed at the end: an existing folder is complete
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$NPROC}" "$PYTHON" -m prd tiny-base --out "$BASE"
fi

# torchrun shares its rendezvous store with the workers; after a restart the new workers
# then read the dead ones' addresses and fail to connect (measured with torch 2.13, gloo;
# pytorch/pytorch#135712). A store of its own per restart avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# --resume auto: a rerun (or a restart after a dead rank) continues from the last checkpoint
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-2}" -m prd train --config configs/oracle.yaml --out "$RUN" --resume auto

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$NPROC}"
mkdir -p "$RUN/meshes"
{ cat configs/oracle_heldout_prompts.txt; head -n 6 configs/oracle_train_prompts.txt; } > "$RUN/meshes/prompts.txt"
"$PYTHON" -m prd sample --ckpt "$RUN" --prompts-file "$RUN/meshes/prompts.txt" --out "$RUN/meshes"
"$PYTHON" -m bench.oracle_quality --run "$RUN" --json "$RUN/quality.json"
echo "meshes in $RUN/meshes, scores in $RUN/quality.json, TensorBoard logs in $RUN/tb"
