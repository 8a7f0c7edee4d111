#!/usr/bin/env bash
# The README's "Against other methods", ablation and sensitivity numbers, one job after another
# (2 cores: never two at once). Finished stages are reused, so rerunning resumes.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
$GP compare configs/compare_methods.yaml
$GP compare configs/ablation_merge.yaml
$GP compare configs/ablation_density.yaml
# Gradient sensitivity (paper Fig. 2): a 150-step IGIA run, the ranking after every step vs the last.
[ -f results/sensitivity/scores_150/scores.json ] || \
  $GP score --model smollm2-135m --task arc_easy --steps 150 --lr 1e-4 --batch-size 8 --out results/sensitivity/scores_150
$GP sensitivity results/sensitivity/scores_150/scores.json --k 12 --out results/sensitivity
