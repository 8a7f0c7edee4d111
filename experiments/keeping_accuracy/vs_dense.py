"""How far each pruned and fine-tuned model stays from the dense model fine-tuned alike: per grid, per
(depth, method), the mean over tasks of (pruned − dense) on the same test items, with a paired bootstrap
95% interval that resamples each task's items within that task (each task weighs the same). Reads the
finished cells of a compare grid; cells still running are left out and listed.

    .venv/bin/python experiments/keeping_accuracy/vs_dense.py results/keeping_accuracy/headline
    .venv/bin/python experiments/keeping_accuracy/vs_dense.py results/keeping_accuracy/three_epochs
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from gradpruner.evaluation.stats import paired_bootstrap_tasks, paired_scores


def labels(cell: Path) -> dict[str, str]:
    return dict(part.split("=", 1) for part in cell.name.split(","))


def main(grid: Path) -> None:
    groups: dict[tuple, list] = defaultdict(list)
    missing = []
    for cell in sorted((grid / "cells").iterdir()):
        pruned, dense = cell / "eval" / "pruned_ft.json", cell / "eval" / "dense_ft.json"
        if not (pruned.is_file() and dense.is_file()):
            missing.append(cell.name)
            continue
        lab = labels(cell)
        task = lab.pop("task")
        pair = paired_scores(json.loads(pruned.read_text()), json.loads(dense.read_text()))
        groups[tuple(sorted(lab.items()))].append((task, pair))
    lines = ["| cell | tasks | pruned − dense fine-tuned, mean of tasks [paired 95% interval] |", "|---|---|---|"]
    for key, rows in sorted(groups.items(), key=lambda kv: [int(v) if v.isdigit() else v for _, v in kv[0]]):
        d, lo, hi = paired_bootstrap_tasks([pair for _, pair in rows])
        lines.append(f"| {', '.join(f'{k}={v}' for k, v in key)} | {', '.join(t for t, _ in rows)} | "
                     f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    (grid / "vs_dense.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
