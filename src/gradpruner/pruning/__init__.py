"""Stage 3, prune: merge rules, MoE expert merging, in-memory and streamed surgery, hidden-size pruning."""
