#!/usr/bin/env bash
# "Against other methods", the merge-count and density ablations and the sensitivity curve, one job after
# another (2 cores: never two at once). Finished stages are reused, so rerunning resumes.
#   bash experiments/methods_and_ablations/run_compare.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
HERE=experiments/methods_and_ablations
$GP compare $HERE/compare_methods.yaml
$GP compare $HERE/ablation_merge.yaml
$GP compare $HERE/ablation_density.yaml
# Gradient sensitivity (paper Fig. 2): a 150-step IGIA run, the ranking after every step vs the last.
[ -f results/sensitivity/scores_150/scores.json ] || \
  $GP score --model smollm2-135m --task arc_easy --steps 150 --lr 1e-4 --batch-size 8 --out results/sensitivity/scores_150
$GP sensitivity results/sensitivity/scores_150/scores.json --k 12 --out results/sensitivity
