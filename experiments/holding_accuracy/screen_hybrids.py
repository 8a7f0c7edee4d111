"""Second screen: removal measured directly, and IGIA guarded by it.

The first screen (experiments/holding_accuracy/screen_variants.py) found that no re-weighting of the IGIA sum avoids a
catastrophic plan: rankings by gradient size put either the deepest or the earliest layers last.
Here each layer is removed alone and the calibration loss measured (the PPL criterion of Shortened
LLaMA, Kim et al. 2024), and three ways to combine that with IGIA are screened on the same
validation slice. Reads and extends results/holding_accuracy/screen/screen.json.

    OMP_NUM_THREADS=2 PYTHONPATH=experiments/holding_accuracy .venv/bin/python experiments/holding_accuracy/screen_hybrids.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from screen_variants import VAL_LIMIT, VAL_OFFSET, plot_screen, skipped, val_loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--screen", default="results/holding_accuracy/screen/screen.json")
    ap.add_argument("--prune", type=int, default=12)
    args = ap.parse_args(argv)

    from gradpruner.data.examples import load_examples, tokenize
    from gradpruner.evaluation.evaluate import evaluate
    from gradpruner.models.loading import load_model, load_tokenizer, resolve_model
    from gradpruner.planning import plans as planning
    from gradpruner.scoring import methods as selection
    from gradpruner.scoring.variants import guarded

    path = Path(args.screen)
    screen = json.loads(path.read_text())
    src = resolve_model("smollm2-135m")
    model, tok = load_model(src), load_tokenizer(src)
    model.eval()
    train = load_examples(task="arc_easy", split="train", seed=0)
    held = load_examples(task="arc_easy", split="eval", seed=0)[VAL_OFFSET:VAL_OFFSET + VAL_LIMIT]
    ctx = selection.Context(model, tok, tokenize(train, tok, max_length=384), seed=0, calib_examples=64)
    batches = ctx.batches()

    def calib_loss(drop):
        with skipped(model, set(drop)), torch.no_grad():
            return sum(model(**b, use_cache=False).loss.item() for b in batches) / len(batches)

    n = len(screen["rankings"]["igia"])
    base = calib_loss([])
    single = [calib_loss([j]) - base for j in range(n)]
    print("single-removal loss increase:", [round(x, 3) for x in single], flush=True)
    igia = screen["rankings"]["igia"]
    rank = lambda s: {j: r for r, j in enumerate(sorted(range(n), key=lambda j: (s[j], j)))}  # noqa: E731
    r_igia, r_rem = rank(igia), rank(single)
    cands = {
        "removal_loss": [float(x) for x in single],  # higher damage = more important
        "rankavg_igia_removal": [float(r_igia[j] + r_rem[j]) for j in range(n)],
    }
    bi = screen["rankings"]["block_influence"]
    for pool in (16, 18, 20):  # IGIA decides among the `pool` layers whose removal alone hurts least
        cands[f"igia_guarded_loss(pool {pool})"] = guarded(igia, single, pool)
    for pool in (16, 18):  # … or whose block influence is lowest
        cands[f"igia_guarded(pool {pool})"] = guarded(igia, bi, pool)
    rows = screen["rows"]
    for name, s in cands.items():
        drop = sorted(planning.make_plan(s, args.prune)["drop"])
        with skipped(model, set(drop)):
            loss = val_loss(model, tok, held)
            acc = evaluate(model, tok, task="arc_easy", offset=VAL_OFFSET, limit=VAL_LIMIT, progress=False)["value"]
        rows.append({"variant": name, "drop": drop, "val_loss": loss, "val_acc": acc})
        screen["rankings"][name] = s
        print(f"{name:26s} loss {loss:7.3f} acc {acc:.3f} drop {drop}", flush=True)
    screen["single_removal_calib_loss_increase"] = single
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(screen, indent=1))
    tmp.replace(path)
    plot_screen(screen, path.with_name("screen.png"))


if __name__ == "__main__":
    main()
