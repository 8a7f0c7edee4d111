"""Print the table of results/healing_the_cut/: per plan and heal, the held-out loss before fine-tuning
(ratio to the dense model's), the mean hidden-state error after the cuts, and validation accuracy."""
import json
import math
from pathlib import Path

OUT = Path("results/healing_the_cut")


def main() -> None:
    dense = json.loads((OUT / "dense.json").read_text())
    print("| plan | heal | held-out loss (× dense) | hidden-state error after the cuts, mean | val acc (n) | 95% interval |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | – | – | – | {dense['value']:.3f} ({dense['n']}) | ±{1.96 * math.sqrt(dense['value'] * (1 - dense['value']) / dense['n']):.3f} |")
    for plan in sorted(p for p in OUT.iterdir() if p.is_dir()):
        for ev in sorted(plan.glob("*.json")):
            if ev.name.endswith(".heal.json") or ev.name == "plan.json":
                continue
            acc = json.loads(ev.read_text())
            heal = plan / f"{ev.stem}.heal.json"
            if heal.is_file():
                h = json.loads(heal.read_text())
                loss = h["loss"]
                errs = [c["error_after"] for c in h["cuts"]]
                before = [c["error_before"] for c in h["cuts"]]
                lcell = f"{loss['before']:.2f} → {loss['after']:.2f} ({loss['after'] / loss['dense']:.2f}×; dense {loss['dense']:.2f})"
                ecell = f"{sum(before) / len(before):.3f} → {sum(errs) / len(errs):.3f}" if errs else "–"
            else:
                lcell, ecell = "(unhealed)", "–"
            p = acc["value"]
            print(f"| {plan.name} | {ev.stem} | {lcell} | {ecell} | {p:.3f} ({acc['n']}) | ±{1.96 * math.sqrt(p * (1 - p) / acc['n']):.3f} |")


if __name__ == "__main__":
    main()
