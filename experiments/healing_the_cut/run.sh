#!/usr/bin/env bash
# Does healing the cut help before any fine-tuning? SmolLM2-135M on ARC-Easy, 12 of 30 layers removed
# by two plans (the default igia_guarded, and block influence), each healed by every objective and token
# choice of the lstsq rule and by the trained rule; measured by heal.json (held-out loss, hidden-state
# error per cut) and by accuracy on the ARC-Easy validation slice (items 250-569; the first 250 are the
# test items of the other studies and are not used here). Checkpoints go to runs/ (not committed); the
# JSON results to results/healing_the_cut/. Finished steps are skipped, so a rerun resumes.
#
#   bash experiments/healing_the_cut/run.sh      # ≈25 min on 2 CPU cores
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
WORK=${WORK:-runs/healing_the_cut}
OUT=results/healing_the_cut
MODEL=smollm2-135m
EVAL=(--task arc_easy --offset 250 --limit 320)
mkdir -p "$WORK" "$OUT"

step() { [ -e "$1" ] && echo "  done: $1" || { echo "  → $1"; shift; "$@"; }; }

step "$OUT/dense.json" $GP eval --model $MODEL "${EVAL[@]}" --out "$OUT/dense.json"
for method in igia_guarded block_influence; do
  s=$WORK/$method
  step "$s/scores/scores.json" $GP score --model $MODEL --task arc_easy --method $method --prune 12 --steps 40 --out "$s/scores"
  step "$s/plan.json" $GP plan --scores "$s/scores/scores.json" --prune 12 --merge 0 --out "$s/plan.json"
  step "$s/pruned" $GP prune --model $MODEL --plan "$s/plan.json" --out "$s/pruned"
  mkdir -p "$OUT/$method"
  cp "$s/plan.json" "$OUT/$method/plan.json"
  step "$OUT/$method/none.json" $GP eval --model "$s/pruned" "${EVAL[@]}" --out "$OUT/$method/none.json"
  for variant in "lstsq l2 all" "lstsq l2 skip_first" "lstsq cosine all" "lstsq cosine skip_first" \
                 "trained cosine all" ; do
    read -r rule objective tokens <<<"$variant"
    name=${rule}_${objective}_${tokens}
    step "$s/$name" $GP heal --model $MODEL --pruned "$s/pruned" --plan "$s/plan.json" --task arc_easy \
      --rule "$rule" --objective "$objective" --tokens "$tokens" --out "$s/$name"
    cp "$s/$name/heal.json" "$OUT/$method/$name.heal.json"
    step "$OUT/$method/$name.json" $GP eval --model "$s/$name" "${EVAL[@]}" --out "$OUT/$method/$name.json"
  done
done
.venv/bin/python experiments/healing_the_cut/table.py > "$OUT/table.md"
cat "$OUT/table.md"
