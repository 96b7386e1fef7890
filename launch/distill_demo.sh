#!/usr/bin/env bash
# The whole method on a CPU: score distillation from three learned tiny teachers.
#   1. build what is missing, once: the tiny SD (runs/tiny_base, shared with the oracle
#      demo) and the tiny MVDream and ND-MV beside a copy of it (runs/tiny_teachers, the
#      paths configs/distill_tiny.yaml reads)
#   2. distill the tiny student from them with configs/distill_tiny.yaml (ASD, CFG with
#      negative prompts, K = 4, both render branches), one DeepSpeed rank per core (NPROC,
#      default 2; gloo on CPU)
#   3. sample the 6 held-out and 6 training prompts to GLB and score the meshes of all 36
#      prompts against their analytic scenes
#   bash launch/distill_demo.sh [RUN_DIR]      (default runs/distill)
# Builds use NPROC threads; on a machine others are loading, OMP_NUM_THREADS=1 is faster
# (two threads on two busy cores spin and wait on each other).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/distill}"
PYTHON="${PYTHON:-python}"
BASE=runs/tiny_base
TEACHERS=runs/tiny_teachers
NPROC="${NPROC:-2}"
THREADS="${OMP_NUM_THREADS:-$NPROC}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

# each is written under another name and renamed at the end: an existing folder is complete
if [ ! -d "$BASE" ]; then
  OMP_NUM_THREADS="$THREADS" "$PYTHON" -m prd tiny-base --out "$BASE"
fi
if [ ! -d "$TEACHERS" ]; then
  OMP_NUM_THREADS="$THREADS" "$PYTHON" -m prd tiny-teachers --base "$BASE" --out "$TEACHERS"
fi

RESUME=()
if [ -f "$RUN/ckpt/latest" ]; then RESUME=(--resume); fi
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m prd train --config configs/distill_tiny.yaml --out "$RUN" "${RESUME[@]}"

export OMP_NUM_THREADS="$THREADS"
mkdir -p "$RUN/meshes"
{ cat configs/oracle_heldout_prompts.txt; head -n 6 configs/oracle_train_prompts.txt; } > "$RUN/meshes/prompts.txt"
"$PYTHON" -m prd sample --ckpt "$RUN" --prompts-file "$RUN/meshes/prompts.txt" --out "$RUN/meshes"
"$PYTHON" -m bench.oracle_quality --run "$RUN" --json "$RUN/quality.json"
echo "meshes in $RUN/meshes, scores in $RUN/quality.json, TensorBoard logs in $RUN/tb"
echo "wall ${SECONDS}s; CPU time (user, system) of this shell, then of every process it ran:"
times
