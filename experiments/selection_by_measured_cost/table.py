"""Print the selection table: the greedy methods from results/selection_by_measured_cost/ beside the
default and block influence from results/healing_the_cut/ (same validation items, same heal)."""
import json
import math
from pathlib import Path

ROOT = Path("results")


def row(name: str, folder: Path, scores: dict | None) -> str:
    plan = json.loads((folder / "plan.json").read_text())
    none = json.loads((folder / "none.json").read_text())
    healed = json.loads((folder / "lstsq_l2_all.json").read_text())
    heal = json.loads((folder / "lstsq_l2_all.heal.json").read_text())["loss"]
    stats = (scores or {}).get("variant_statistics", scores or {})
    cost = f"{stats['seconds']:.0f} s, {stats['forward_passes']} passes" if "seconds" in stats else "–"
    ci = 1.96 * math.sqrt(none["value"] * (1 - none["value"]) / none["n"])
    return (f"| {name} | {', '.join(map(str, plan['drop']))} | {cost} | {heal['before'] / heal['dense']:.2f}× → "
            f"{heal['after'] / heal['dense']:.2f}× | {none['value']:.3f} ±{ci:.3f} | {healed['value']:.3f} |")


def main() -> None:
    print("| method | layers removed | selection cost | held-out loss × dense, unhealed → healed | val acc unhealed (n = 319) | val acc healed |")
    print("|---|---|---|---|---|---|")
    for name in ("igia_greedy", "greedy_loss"):
        f = ROOT / "selection_by_measured_cost" / name
        if (f / "lstsq_l2_all.heal.json").is_file():
            print(row(name, f, json.loads((f / "scores.json").read_text())))
    for name in ("igia_guarded", "block_influence"):
        print(row(name, ROOT / "healing_the_cut" / name, None))


if __name__ == "__main__":
    main()
