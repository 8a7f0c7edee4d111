"""Does healing still help after fine-tuning? The default plan and block influence's plan (12 of 30 removed,
from run.sh), each unhealed and healed (lstsq, cosine, all tokens), fine-tuned alike (150 LoRA steps of
batch 8, lr 2e-4, seed 0) and evaluated on the ARC-Easy validation slice (items 250-569); the healed
minus unhealed difference with its paired bootstrap 95% interval. Finished steps are skipped.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/healing_the_cut/after_finetune.py   # ≈25 min, 2 cores
"""
import json
from pathlib import Path

from gradpruner.evaluation.evaluate import evaluate
from gradpruner.evaluation.stats import paired_bootstrap, paired_scores
from gradpruner.finetuning.finetune import finetune

WORK, OUT = Path("runs/healing_the_cut"), Path("results/healing_the_cut/after_finetune")


def tuned_eval(model: Path, name: str) -> dict:
    out = OUT / f"{name}.json"
    if not out.is_file():
        ft = WORK / f"{name}_ft"
        if not ft.is_dir():
            finetune(str(model), ft, task="arc_easy", max_steps=150, batch_size=8, lr=2e-4)
        evaluate(str(ft), task="arc_easy", offset=250, limit=320, item_scores=True, out=out)
    return json.loads(out.read_text())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["| plan | unhealed, fine-tuned | healed, fine-tuned | healed − unhealed [paired 95% interval] |",
             "|---|---|---|---|"]
    for plan in ("igia_guarded", "block_influence"):
        a = tuned_eval(WORK / plan / "pruned", f"{plan}_none")
        b = tuned_eval(WORK / plan / "lstsq_cosine_all", f"{plan}_lstsq_cosine_all")
        d, lo, hi = paired_bootstrap(*reversed(paired_scores(a, b)))
        lines.append(f"| {plan} | {a['value']:.3f} (n = {a['n']}) | {b['value']:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
