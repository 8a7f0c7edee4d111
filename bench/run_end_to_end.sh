#!/usr/bin/env bash
# End to end on these 2 CPU cores: the GradPruner path (score + plan + prune + fine-tune the pruned
# model) against fine-tuning the dense model with the same budget (150 LoRA steps of batch 8), one
# fresh `gradpruner run` of configs/smollm2_arc_easy.yaml with the default method (igia_guarded, no
# merge), 12 of 30 layers removed. Every stage runs (a fresh run folder, no store), so each stage's
# time is its own; the run report's "Cost of every stage" table holds them.
#
#   bench/run_end_to_end.sh [OUT]      # OUT defaults to results/end_to_end_smollm2; must not exist
#
# About 15 minutes on an otherwise idle machine.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${1:-results/end_to_end_smollm2}
if [ -e "$OUT" ]; then
    echo "$OUT exists; its finished stages would be reused and their times would not be this run's. Remove it or pass another OUT." >&2
    exit 2
fi
${GP:-.venv/bin/gradpruner} run configs/smollm2_arc_easy.yaml "out=$OUT" score.method=igia_guarded plan.merge=0
sed -n '/## Cost of every stage/,/## Config/p' "$OUT/report.md"
