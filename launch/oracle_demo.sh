#!/usr/bin/env bash
# The embedded default run: distill the tiny student from the oracle teachers on the 30
# training scenes, then sample the 6 held-out and 6 training prompts to GLB and score
# every mesh against its analytic scene.
#   bash launch/oracle_demo.sh [RUN_DIR]      (default runs/oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/oracle}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

if [ -f "$RUN/ckpt/latest" ]; then
  python -m prd train --config configs/oracle.yaml --out "$RUN" --resume
else
  python -m prd train --config configs/oracle.yaml --out "$RUN"
fi

mkdir -p "$RUN/meshes"
{ cat configs/oracle_heldout_prompts.txt; head -n 6 configs/oracle_train_prompts.txt; } > "$RUN/meshes/prompts.txt"
python -m prd sample --ckpt "$RUN" --prompts-file "$RUN/meshes/prompts.txt" --out "$RUN/meshes"
python -m bench.oracle_quality --run "$RUN" --json "$RUN/quality.json"
echo "meshes in $RUN/meshes, scores in $RUN/quality.json, TensorBoard logs in $RUN/tb"
