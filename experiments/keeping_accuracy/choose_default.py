"""The default's choice on validation items: igia_guarded minus block influence on every (task, depth)
cell of the validation grid, and the mean of those differences with a paired bootstrap 95% interval that
resamples each cell's items within that cell (each cell weighs the same). Reads the finished grid only.

    GRADPRUNER_DATA_DIR=DIR gradpruner compare experiments/keeping_accuracy/validation.yaml
    .venv/bin/python experiments/keeping_accuracy/choose_default.py
"""
import json
from pathlib import Path

from gradpruner.evaluation.stats import (
    paired_bootstrap,
    paired_bootstrap_tasks,
    paired_scores,
)

CELLS = Path("results/keeping_accuracy/validation/cells")
OUT = Path("results/keeping_accuracy/validation/choice.md")
CANDIDATE, REFERENCE = "igia_guarded", "block_influence"


def result(removed: int, task: str, method: str) -> dict | None:
    path = CELLS / f"removed={removed},task={task},method={method}" / "eval" / "pruned_ft.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    lines = [f"| removed | task | {CANDIDATE} | {REFERENCE} | difference [paired 95% interval] |", "|---|---|---|---|---|"]
    pairs = []
    for removed in (12, 9, 6):
        for task in ("arc_easy", "hellaswag", "fingpt_sentiment"):
            a, b = result(removed, task, CANDIDATE), result(removed, task, REFERENCE)
            if a is None or b is None:
                lines.append(f"| {removed} | {task} | not run | not run | |")
                continue
            pair = paired_scores(a, b)
            pairs.append(pair)
            d, lo, hi = paired_bootstrap(*pair)
            lines.append(f"| {removed} | {task} (n = {a['n']}) | {a['value']:.3f} | {b['value']:.3f} | "
                         f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    if pairs:
        d, lo, hi = paired_bootstrap_tasks(pairs)
        winner = CANDIDATE if d > 0 else REFERENCE
        lines += ["", f"Mean of the {len(pairs)} cells' differences: {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                  f"({'resolved' if lo > 0 or hi < 0 else 'unresolved'}); higher: {winner}."]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
