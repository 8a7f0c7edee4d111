"""Do the greedy plans recover better after fine-tuning? The two greedy plans of run.sh (igia_greedy,
greedy_loss; 12 of 30 removed), each unhealed and healed (lstsq, cosine, all tokens), fine-tuned like the
healing study's plans (150 LoRA steps of batch 8, lr 2e-4, seed 0) and evaluated on the ARC-Easy
validation slice (items 250-569). The table puts them beside the healing study's four fine-tuned cells
(run experiments/healing_the_cut/after_finetune.py first) with each candidate's difference to block
influence (unhealed) and its paired bootstrap 95% interval. This is the validation evidence the default is
chosen on. Finished steps are skipped.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/selection_by_measured_cost/after_finetune.py  # ≈35 min, 2 cores
"""
import json
from pathlib import Path

from gradpruner.api import heal
from gradpruner.evaluation.evaluate import evaluate
from gradpruner.evaluation.stats import paired_bootstrap, paired_scores
from gradpruner.finetuning.finetune import finetune

WORK, OUT = Path("runs/selection_by_measured_cost"), Path("results/selection_by_measured_cost/after_finetune")
HEALING = Path("results/healing_the_cut/after_finetune")


def tuned_eval(model: Path, name: str) -> dict:
    out = OUT / f"{name}.json"
    if not out.is_file():
        ft = WORK / f"{name}_ft"
        if not ft.is_dir():
            finetune(str(model), ft, task="arc_easy", max_steps=150, batch_size=8, lr=2e-4)
        evaluate(str(ft), task="arc_easy", offset=250, limit=320, item_scores=True, out=out)
    return json.loads(out.read_text())


def healed(method: str) -> Path:
    out = WORK / method / "lstsq_cosine_all"
    if not out.is_dir():
        heal("smollm2-135m", WORK / method / "pruned", out, WORK / method / "plan.json", task="arc_easy",
             rule="lstsq", objective="cosine", tokens="all")
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cells = {}
    for plan in ("igia_guarded", "block_influence"):
        for heal_name in ("none", "lstsq_cosine_all"):
            cells[(plan, heal_name)] = json.loads((HEALING / f"{plan}_{heal_name}.json").read_text())
    for plan in ("igia_greedy", "greedy_loss"):
        cells[(plan, "none")] = tuned_eval(WORK / plan / "pruned", f"{plan}_none")
        cells[(plan, "lstsq_cosine_all")] = tuned_eval(healed(plan), f"{plan}_lstsq_cosine_all")
    ref = cells[("block_influence", "none")]
    lines = ["| plan | heal | accuracy after fine-tuning | − block influence (unhealed) [paired 95% interval] |",
             "|---|---|---|---|"]
    for (plan, heal_name), r in cells.items():
        d, lo, hi = paired_bootstrap(*paired_scores(r, ref))
        lines.append(f"| {plan} | {heal_name} | {r['value']:.3f} (n = {r['n']}) | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
