"""How far each pruned and fine-tuned model stays from the dense model fine-tuned alike: per grid, per
(depth, method), the mean over tasks of (pruned − dense) on the same test items, with a paired bootstrap
95% interval that resamples each task's items within that task (each task weighs the same). Reads the
finished cells of a compare grid; cells still running are left out and listed.

    .venv/bin/python experiments/keeping_accuracy/vs_dense.py experiments/keeping_accuracy/headline.yaml
    .venv/bin/python experiments/keeping_accuracy/vs_dense.py experiments/keeping_accuracy/three_epochs.yaml
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from gradpruner.evaluation.stats import paired_bootstrap_tasks, paired_scores
from gradpruner.pipeline.compare import load_grid


def main(grid: Path) -> None:
    out, cells = load_grid(grid)
    groups: dict[tuple, list] = defaultdict(list)
    missing = []
    for labels, cfg in cells:
        pruned, dense = Path(cfg.out) / "eval" / "pruned_ft.json", Path(cfg.out) / "eval" / "dense_ft.json"
        if not (pruned.is_file() and dense.is_file()):
            missing.append(Path(cfg.out).name)
            continue
        others = {k: v for k, v in labels.items() if k != "task"}
        pair = paired_scores(json.loads(pruned.read_text()), json.loads(dense.read_text()))
        groups[tuple(sorted(others.items()))].append((labels["task"], pair))
    lines = ["| cell | tasks | pruned − dense fine-tuned, mean of tasks [paired 95% interval] |", "|---|---|---|"]
    for key, rows in sorted(groups.items(), key=lambda kv: [int(v) if v.isdigit() else v for _, v in kv[0]]):
        rows.sort(key=lambda row: row[0])  # tasks in name order: the bootstrap's draws follow the order
        d, lo, hi = paired_bootstrap_tasks([pair for _, pair in rows])
        lines.append(f"| {', '.join(f'{k}={v}' for k, v in key)} | {', '.join(t for t, _ in rows)} | "
                     f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    (out / "vs_dense.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
