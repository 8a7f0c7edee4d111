#!/usr/bin/env bash
# "What pruning buys" on these 2 CPU cores: SmolLM2-135M dense vs 12 of its 30 layers removed.
#
#   bench/run_bench.sh [PRUNED_CHECKPOINT] [OUT]
#
# PRUNED_CHECKPOINT defaults to the first checkpoint in results/store whose plan removed 12 of 30
# layers (any such plan gives the same shapes, so the same costs; which layers went does not matter
# here). OUT defaults to bench/results/what_pruning_buys. About 10 minutes; run it on an otherwise
# idle machine, since other load on the cores is noise that alternation only partly cancels;
# REPS=9 bench/run_bench.sh takes more alternating runs (default 5).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
GP=${GP:-.venv/bin/gradpruner}
PY=${PY:-.venv/bin/python}

PRUNED=${1:-$($PY - <<'PY'
import json, pathlib
for f in sorted(pathlib.Path("results/store").glob("prune-*/pruned/gradpruner.json")):
    plan = json.loads(f.read_text()).get("plan", {})
    if plan.get("num_layers") == 30 and len(plan.get("drop", [])) == 12:
        print(f.parent)
        break
PY
)}
OUT=${2:-bench/results/what_pruning_buys}
if [ -z "$PRUNED" ]; then
    echo "no 12-of-30 pruned checkpoint in results/store; pass one: bench/run_bench.sh PRUNED_DIR" >&2
    exit 2
fi

$GP bench --model smollm2-135m --pruned "$PRUNED" \
    --seq 128 512 --batch 1 4 --reps "${REPS:-5}" --warmup 1 --new-tokens 16 \
    --train-batch 4 --train-seq 128 --rank 8 --dtype float32 --device cpu \
    --out "$OUT" --overwrite
