#!/usr/bin/env bash
# Runs the README's SmolLM2 result configs one after another (2 cores: never two at once).
# Each run folder under results/ is reusable: rerunning skips finished stages.
#   HF_HUB_OFFLINE=1 bash bench/run_results.sh [task ...]
set -u
cd "$(dirname "$0")/.."
tasks=${*:-arc_easy piqa winogrande medmcqa fingpt_sentiment}
for t in $tasks; do
  echo "=== $t $(date -u +%H:%M:%S)"
  .venv/bin/gradpruner run "configs/smollm2_$t.yaml" || echo "=== $t FAILED"
done
echo "=== done $(date -u +%H:%M:%S)"
