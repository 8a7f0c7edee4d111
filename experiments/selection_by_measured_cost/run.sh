#!/usr/bin/env bash
# Selection by measured cost, before any fine-tuning: SmolLM2-135M on ARC-Easy, 12 of 30 layers removed by
# the greedy search over calibration loss (every layer a candidate: greedy_loss; or only the 24 layers IGIA
# ranks lowest: igia_greedy), against the default (igia_guarded) and block influence, whose pruned models
# come from experiments/healing_the_cut/run.sh (run it first). Measured: the selection's cost (seconds,
# forward passes over the calibration batches, from scores.json) and accuracy on the ARC-Easy validation
# slice (items 250-569), unhealed and healed by lstsq (l2, all tokens). Finished steps are skipped.
#
#   bash experiments/selection_by_measured_cost/run.sh      # ≈30 min on 2 CPU cores
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
WORK=${WORK:-runs/selection_by_measured_cost}
OUT=results/selection_by_measured_cost
MODEL=smollm2-135m
EVAL=(--task arc_easy --offset 250 --limit 320)
mkdir -p "$WORK" "$OUT"

step() { [ -e "$1" ] && echo "  done: $1" || { echo "  → $1"; shift; "$@"; }; }

for method in igia_greedy greedy_loss; do
  s=$WORK/$method
  step "$s/scores/scores.json" $GP score --model $MODEL --task arc_easy --method $method --prune 12 --steps 40 --out "$s/scores"
  step "$s/plan.json" $GP plan --scores "$s/scores/scores.json" --prune 12 --merge 0 --out "$s/plan.json"
  step "$s/pruned" $GP prune --model $MODEL --plan "$s/plan.json" --out "$s/pruned"
  mkdir -p "$OUT/$method"
  cp "$s/plan.json" "$OUT/$method/plan.json"
  cp "$s/scores/scores.json" "$OUT/$method/scores.json"
  step "$OUT/$method/none.json" $GP eval --model "$s/pruned" "${EVAL[@]}" --out "$OUT/$method/none.json"
  step "$s/lstsq_l2_all" $GP heal --model $MODEL --pruned "$s/pruned" --plan "$s/plan.json" --task arc_easy \
    --rule lstsq --objective l2 --tokens all --out "$s/lstsq_l2_all"
  cp "$s/lstsq_l2_all/heal.json" "$OUT/$method/lstsq_l2_all.heal.json"
  step "$OUT/$method/lstsq_l2_all.json" $GP eval --model "$s/lstsq_l2_all" "${EVAL[@]}" --out "$OUT/$method/lstsq_l2_all.json"
done
