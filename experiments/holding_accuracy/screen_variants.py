"""Screen layer-selection variants on a validation slice before any fine-tuning.

Every candidate ranking (the paper's IGIA, IGIA variants computed from the same stored factors, the
same rankings under removal constraints, and the baselines) becomes a 12-of-30 plan; each plan is
applied by skipping its layers (weights untouched, nothing merged) and measured on the validation
slice only — ARC-Easy held-out items 250..569, disjoint from the 250 test items every reported test number
uses — by completion loss and accuracy. Fine-tuning then decides among the best few
(experiments/holding_accuracy/select.yaml); this screen only narrows the field cheaply.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/holding_accuracy/screen_variants.py \
        --scores results/store/score-dc2685d26a6c1519/scores --out results/holding_accuracy/screen
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VAL_OFFSET, VAL_LIMIT = 250, 320


def skipped(model, drop):
    """Context: the model with ``drop`` layers left out of the forward pass (weights untouched)."""
    from gradpruner.models.architectures import find_decoder_layers, only_layers
    n = len(find_decoder_layers(model)[2])
    return only_layers(model, [i for i in range(n) if i not in drop])


def val_loss(model, tok, examples) -> float:
    from gradpruner.data.examples import PadCollator, tokenize
    feats = tokenize(examples, tok, max_length=384)
    collate = PadCollator(tok.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(feats), 16):
            b = collate(feats[i:i + 16])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            lab = b["labels"][:, 1:]
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab.flatten(),
                                                   ignore_index=-100, reduction="sum")
            total, count = total + float(lp), count + int((lab != -100).sum())
    return total / count


def plot_screen(screen: dict, path: Path) -> None:
    """One bar per distinct plan: validation loss with the plan's layers skipped (lower is better)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted((r for r in screen["rows"] if "same_as" not in r), key=lambda r: r["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    colors = ["tab:red" if r["variant"] == "igia" else "tab:blue" if r["variant"].startswith("igia") else "tab:gray"
              for r in rows]
    ax.barh([r["variant"] for r in rows], [r["val_loss"] for r in rows], color=colors)
    ax.axvline(screen["dense"]["val_loss"], color="k", ls="--", lw=1, label="dense")
    ax.invert_yaxis()
    ax.set_xlabel("ARC-Easy validation loss, 12 of 30 layers skipped, before fine-tuning")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scores", required=True, help="an IGIA score folder (scores.json + igia.safetensors)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--prune", type=int, default=12)
    ap.add_argument("--out", default="results/holding_accuracy/screen")
    ap.add_argument("--plot-only", action="store_true", help="redraw screen.png from screen.json")
    ap.add_argument("--acc-top", type=int, default=5, help="also measure accuracy for the K lowest-loss plans")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot_screen(json.loads((Path(args.out) / "screen.json").read_text()), Path(args.out) / "screen.png")
        return

    from gradpruner.data.examples import load_examples, tokenize
    from gradpruner.evaluation.evaluate import evaluate
    from gradpruner.models.loading import load_model, load_tokenizer, resolve_model
    from gradpruner.planning import plans as planning
    from gradpruner.scoring import methods as selection
    from gradpruner.scoring import variants
    from gradpruner.util.atomic import read_json, write_json

    src = resolve_model(args.model)
    model, tok = load_model(src), load_tokenizer(src)
    sc = read_json(Path(args.scores) / "scores.json", "scores")
    train = load_examples(task=args.task, split="train", seed=0)
    held = load_examples(task=args.task, split="eval", seed=0)[VAL_OFFSET:VAL_OFFSET + VAL_LIMIT]
    ctx = selection.Context(model, tok, tokenize(train, tok, max_length=384), seed=0, calib_examples=64)
    rankings = {"igia": sc["layer_scores"]}
    stats = variants.residual_scales(model, ctx.batches())  # the re-weighting variants need no other statistics
    rankings.update({name: fn(model, sc, Path(args.scores) / "igia.safetensors", stats)
                     for name, (fn, need) in variants.VARIANTS.items() if need in (None, "residual")})
    for m in ("block_influence", "removal_taylor"):
        rankings[m] = selection.METHODS[m].fn(ctx)["layer_scores"]
    constraints = {"": (0, None), "+pl2": (2, None), "+mb3": (0, 3), "+pl2mb3": (2, 3)}
    plans = {}
    for name, s in rankings.items():
        for suffix, (pl, mb) in constraints.items():
            if suffix and name in ("block_influence",):
                continue
            try:
                plan = planning.make_plan(s, args.prune, protect_last=pl, max_block=mb)
            except Exception as e:  # noqa: BLE001 - a constraint set may be infeasible; note and go on
                print(f"{name}{suffix}: {e}")
                continue
            plans[name + suffix] = sorted(plan["drop"])
    seen, rows = {}, []
    model.eval()
    for name, drop in plans.items():
        key = tuple(drop)
        if key in seen:
            rows.append({**seen[key], "variant": name, "same_as": seen[key]["variant"]})
            continue
        t0 = time.time()
        with skipped(model, set(drop)):
            loss = val_loss(model, tok, held)
        row = {"variant": name, "drop": drop, "val_loss": loss, "seconds": round(time.time() - t0, 1)}
        seen[key] = row
        rows.append(row)
        print(f"{name:28s} loss {loss:7.3f}  drop {drop}", flush=True)
    # accuracy (slower) only for the plans with the lowest loss
    for row in sorted(seen.values(), key=lambda r: r["val_loss"])[:args.acc_top]:
        with skipped(model, set(row["drop"])):
            row["val_acc"] = evaluate(model, tok, task=args.task, offset=VAL_OFFSET, limit=VAL_LIMIT,
                                      progress=False)["value"]
        print(f"{row['variant']:28s} acc {row['val_acc']:.3f}", flush=True)
    with skipped(model, set()):
        dense = {"val_loss": val_loss(model, tok, held)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "screen.json", {"dense": dense, "rows": rows, "rankings": rankings,
                                     "validation": {"offset": VAL_OFFSET, "limit": VAL_LIMIT}})
    plot_screen(json.loads((out / "screen.json").read_text()), out / "screen.png")
    print(f"dense val loss {dense['val_loss']:.3f}; wrote {out / 'screen.json'} and screen.png")


if __name__ == "__main__":
    main()
