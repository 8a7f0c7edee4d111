"""Print the five-task results table from the run folders under results/ (one row per task).

    .venv/bin/python experiments/paper_method_five_tasks/results_table.py results/smollm2_*
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLS = [("dense_zero_shot", "dense zero-shot"), ("dense_ft", "dense fine-tuned"),
        ("pruned", "pruned, no fine-tune"), ("pruned_ft", "GradPruner (pruned + fine-tuned)")]


def row(run: Path) -> str | None:
    evals = {k: json.loads(p.read_text()) for k, _ in COLS if (p := run / "eval" / f"{k}.json").is_file()}
    if not evals:
        return None
    first = next(iter(evals.values()))
    cells = [f"{evals[k]['value']:.3f}" if k in evals else "–" for k, _ in COLS]
    gap = (f"{evals['pruned_ft']['value'] - evals['dense_ft']['value']:+.3f}"
           if "pruned_ft" in evals and "dense_ft" in evals else "–")
    stages = {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json") if "started" not in p.name}
    ft = (f"{stages['pruned_ft']['usage']['seconds'] / stages['dense_ft']['usage']['seconds']:.2f}"
          if "pruned_ft" in stages and "dense_ft" in stages else "–")
    return f"| {first['task']} | {first['metric']} | {first['n']} | " + " | ".join(cells) + f" | {gap} | {ft} |"


def main(runs: list[str]) -> None:
    print("| task | metric | n | " + " | ".join(label for _, label in COLS) + " | GradPruner − dense FT | fine-tune time pruned/dense |")
    print("|---|---|---|" + "---|" * (len(COLS) + 2))
    for r in runs:
        line = row(Path(r))
        if line:
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
