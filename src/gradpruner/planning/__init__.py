"""Stage 2, plan: which layers are removed and which are merged into which, as a readable plan.json."""
