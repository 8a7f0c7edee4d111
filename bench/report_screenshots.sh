#!/usr/bin/env bash
# Screenshots of the two report pages as Chromium shows them in a 1280-px window: the demo's run report
# and the compare page of the held-out comparison (both rewritten from their committed files first).
#
#   bash bench/report_screenshots.sh      # ≈1 min; needs Debian's chromium (make browser)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
$GP report results/demo
$GP compare experiments/holding_accuracy/final.yaml --table-only
shot() { chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,"$3" \
           --screenshot="$PWD/$2" "file://$PWD/$1" 2>/dev/null; echo "wrote $2"; }
shot results/demo/report.html docs/img/run_report.png 2600
shot results/holding_accuracy/final/table.html docs/img/compare_report.png 2600
