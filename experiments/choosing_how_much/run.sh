#!/usr/bin/env bash
# How small can SmolLM2-135M get and still do ARC-Easy? `gradpruner search` with a 2-point tolerance
# (validation items 249..568), then the recommended plan's TEST accuracy (held-out items 0..248, never
# looked at by the search) after the same fine-tune, against the dense model fine-tuned alike, with the
# paired bootstrap 95% interval; then a second search with a 5-point tolerance that reuses every point it can.
#
#   bash experiments/choosing_how_much/run.sh      # ≈40 min on 2 CPU cores (the second search adds what it lacks)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GP=${GP:-.venv/bin/gradpruner}
OUT=results/choosing_how_much
STORE=runs/choosing_how_much/store   # checkpoints stay out of git; the point records are copied below
mkdir -p "$OUT"

/usr/bin/time -f "search 0.02: %e s" $GP search --model smollm2-135m --task arc_easy --max-drop 0.02 \
  --out "$OUT/max_drop_0.02" --store "$STORE" 2>&1 | tee "$OUT/max_drop_0.02.log"
.venv/bin/python experiments/choosing_how_much/test_items.py "$OUT/max_drop_0.02" | tee "$OUT/max_drop_0.02/test.md"
/usr/bin/time -f "search 0.05: %e s" $GP search --model smollm2-135m --task arc_easy --max-drop 0.05 \
  --out "$OUT/max_drop_0.05" --store "$STORE" 2>&1 | tee "$OUT/max_drop_0.05.log"
