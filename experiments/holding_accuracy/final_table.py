"""Print the holding-accuracy outcome table from results/holding_accuracy/final/table.json.

Rows: dense fine-tuned, the paper's GradPruner, the chosen variant, block influence, last_n; columns:
accuracy on the test items at 12 and 9 of 30 layers removed per task, with the average, then the
fine-tune budget and wall time. Cells that did not run print "–".

    .venv/bin/python experiments/holding_accuracy/final_table.py [results/holding_accuracy/final/table.json]
    .venv/bin/python experiments/holding_accuracy/final_table.py --full-ft   # LoRA vs full fine-tuning at 12/30 (ARC-Easy, PIQA)
"""
from __future__ import annotations

import json
import sys
from statistics import mean

TASKS = ["arc_easy", "piqa", "fingpt_sentiment"]
NAMES = {"arc_easy": "ARC-Easy", "piqa": "PIQA", "fingpt_sentiment": "FinGPT"}
ROWS = [("igia_guarded", "**GradPruner, IGIA guarded (default)**"), ("paper", "GradPruner, paper (`score.method: igia`)"),
        ("block_influence", "block influence (ShortGPT)"), ("last_n", "last n layers")]


def fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def main(path: str = "results/holding_accuracy/final/table.json") -> None:
    rows = json.load(open(path))
    cell = {(str(r["removed"]), r["method"], r["task"]): r for r in rows}
    head = ["method"] + [f"{NAMES[t]} {k}/30" for k in ("12", "9") for t in TASKS] + ["avg 12/30", "avg 9/30",
                                                                                       "pruned FT s (12/30)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    dense = [next((r["dense_ft"] for r in rows if r["task"] == t and r.get("dense_ft") is not None), None) for t in TASKS]
    dense_s = mean(r["dense_ft_s"] for r in rows if r.get("dense_ft_s"))
    print("| dense, fine-tuned | " + " | ".join(fmt(v) for v in dense * 2) + f" | {fmt(mean(dense))} | {fmt(mean(dense))} | "
          f"{dense_s:.0f} (dense) |")
    for method, label in ROWS:
        vals = {k: [cell.get((k, method, t), {}).get("pruned_ft") for t in TASKS] for k in ("12", "9")}
        avg = {k: mean(v) if all(x is not None for x in v) else None for k, v in vals.items()}
        secs = [cell[("12", method, t)]["pruned_ft_s"] for t in TASKS if ("12", method, t) in cell]
        print(f"| {label} | " + " | ".join(fmt(v) for k in ("12", "9") for v in vals[k]) +
              f" | {fmt(avg['12'])} | {fmt(avg['9'])} | {mean(secs):.0f} |")


def full_ft(lora_path: str = "results/holding_accuracy/final/table.json",
            full_path: str = "results/holding_accuracy/full_ft/table.json") -> None:
    """12 of 30 removed, the same layer choices recovered by 150 steps of LoRA or of full fine-tuning."""
    tasks = TASKS[:2]
    lora = {(r["method"], r["task"]): r for r in json.load(open(lora_path)) if str(r["removed"]) == "12"}
    full = {(r["method"], r["task"]): r for r in json.load(open(full_path))}
    head = ["method"] + [f"{NAMES[t]} {how}" for t in tasks for how in ("LoRA", "full FT")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    dense = [(next(r["dense_ft"] for (m, t2), r in lora.items() if t2 == t),
              next((r["dense_ft"] for (m, t2), r in full.items() if t2 == t), None)) for t in tasks]
    print("| dense, fine-tuned | " + " | ".join(fmt(v) for pair in dense for v in pair) + " |")
    for method, label in ROWS:
        vals = [(lora.get((method, t), {}).get("pruned_ft"), full.get((method, t), {}).get("pruned_ft")) for t in tasks]
        print(f"| {label} | " + " | ".join(fmt(v) for pair in vals for v in pair) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--full-ft"]:
        full_ft(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
