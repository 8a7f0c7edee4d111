#!/usr/bin/env bash
# The ablations beyond merge count and density, and accuracy against depth (after run_compare.sh; same store).
#   bash experiments/methods_and_ablations/run_ablations.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
HERE=experiments/methods_and_ablations
$GP compare $HERE/ablation_granularity.yaml
$GP compare $HERE/ablation_scoring.yaml
$GP compare $HERE/compare_depth.yaml
