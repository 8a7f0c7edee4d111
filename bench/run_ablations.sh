#!/usr/bin/env bash
# The README's ablations beyond merge count and density (after bench/run_compare.sh; same store).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
$GP compare configs/ablation_granularity.yaml
$GP compare configs/ablation_scoring.yaml
$GP compare configs/compare_depth.yaml
