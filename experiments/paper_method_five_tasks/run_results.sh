#!/usr/bin/env bash
# Runs the five SmolLM2 task configs one after another (2 cores: never two at once): ARC-Easy from
# configs/smollm2_arc_easy.yaml (also the example run config), the other four from this folder.
# Each run folder under results/ is reusable: rerunning skips finished stages.
#   HF_HUB_OFFLINE=1 bash experiments/paper_method_five_tasks/run_results.sh [task ...]
set -u
cd "$(dirname "$0")/../.."
tasks=${*:-arc_easy piqa winogrande medmcqa fingpt_sentiment}
for t in $tasks; do
  cfg=experiments/paper_method_five_tasks/smollm2_$t.yaml
  [ -f "$cfg" ] || cfg=configs/smollm2_$t.yaml
  echo "=== $t $(date -u +%H:%M:%S)"
  .venv/bin/gradpruner run "$cfg" || echo "=== $t FAILED"
done
echo "=== done $(date -u +%H:%M:%S)"
