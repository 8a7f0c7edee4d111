"""The default's choice on validation items: igia_guarded minus block influence on every (task, depth)
cell of the validation grid, and the mean of those differences with a paired bootstrap 95% interval that
resamples each cell's items within that cell (each cell weighs the same). Reads the finished grid only.

    GRADPRUNER_DATA_DIR=DIR gradpruner compare experiments/keeping_accuracy/validation.yaml
    .venv/bin/python experiments/keeping_accuracy/choose_default.py

Another grid and pair of method labels: ``choose_default.py GRID CANDIDATE REFERENCE`` (written to
``choice-CANDIDATE-REFERENCE.md`` in that grid's output folder), e.g. the block search against the default:

    .venv/bin/python experiments/keeping_accuracy/choose_default.py \
        experiments/keeping_accuracy/blocks_validation.yaml igia_blocks igia_guarded
"""
import json
import sys
from pathlib import Path

from gradpruner.evaluation.stats import (
    paired_bootstrap,
    paired_bootstrap_tasks,
    paired_scores,
)
from gradpruner.pipeline.compare import load_grid

GRID = Path("experiments/keeping_accuracy/validation.yaml")
CANDIDATE, REFERENCE = "igia_guarded", "block_influence"


def results(grid: Path = GRID) -> tuple[Path, dict[tuple[str, str], dict[str, dict | None]]]:
    """The grid's output folder and, per (removed, task) in grid order, each method's pruned_ft evaluation."""
    out, cells = load_grid(grid)
    found: dict[tuple[str, str], dict[str, dict | None]] = {}
    for labels, cfg in cells:
        path = Path(cfg.out) / "eval" / "pruned_ft.json"
        found.setdefault((labels["removed"], labels["task"]), {})[labels["method"]] = (
            json.loads(path.read_text()) if path.is_file() else None)
    return out, found


def main(grid: Path = GRID, candidate: str = CANDIDATE, reference: str = REFERENCE) -> None:
    out, found = results(grid)
    lines = [f"| removed | task | {candidate} | {reference} | difference [paired 95% interval] |", "|---|---|---|---|---|"]
    pairs = []
    for (removed, task), by_method in found.items():
        a, b = by_method[candidate], by_method[reference]
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
        winner = candidate if d > 0 else reference
        lines += ["", f"Mean of the {len(pairs)} cells' differences: {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                  f"({'resolved' if lo > 0 or hi < 0 else 'unresolved'}); higher: {winner}."]
    name = "choice.md" if (candidate, reference) == (CANDIDATE, REFERENCE) else f"choice-{candidate}-{reference}.md"
    (out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) not in (1, 4):
        sys.exit("usage: choose_default.py [GRID CANDIDATE REFERENCE]")
    main(*([Path(sys.argv[1]), sys.argv[2], sys.argv[3]] if len(sys.argv) == 4 else []))
