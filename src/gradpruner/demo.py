"""The demo: score → plan → prune a real model on a real task and show what was won and lost."""
from __future__ import annotations

import time
from pathlib import Path

from . import api
from .data import load_examples, tokenize
from .evaluation import heldout_loss
from .models import load_model, load_tokenizer, resolve_model
from .planning import plan_summary
from .reporting import plot_layer_scores, score_bars


def run_demo(args) -> dict:
    out = Path(args.out)
    t0 = time.time()
    print(f"[1/4] scoring: {args.steps} LoRA steps of {args.model} on {args.task}")
    scores = api.score(args.model, out / "scores", task=args.task, data_dir=args.data_dir, steps=args.steps, overwrite=True)
    print(f"[2/4] planning: remove {args.prune} layers, merge {args.merge} of them")
    plan = api.plan(out / "scores" / "scores.json", out / "plan.json", prune=args.prune, merge=args.merge, overwrite=True)
    print(f"[3/4] pruning into {out / 'pruned'}")
    api.prune(args.model, plan, out / "pruned", overwrite=True)
    plot_layer_scores(scores["layer_scores"], out / "scores" / "layer_scores.png", set(plan["drop"]), plan["merge"])

    print(f"[4/4] held-out loss on {args.eval_examples} {args.task} evaluation examples")
    source = resolve_model(args.model)
    tok = load_tokenizer(source)
    feats = tokenize(load_examples(task=args.task, split="eval", data_dir=args.data_dir)[: args.eval_examples], tok)
    dense, pruned = load_model(source), load_model(out / "pruned")
    loss_dense, loss_pruned = heldout_loss(dense, tok, feats), heldout_loss(pruned, tok, feats)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())

    print("\nLayer scores (IGIA, log scale):")
    print(score_bars(scores["layer_scores"], set(plan["drop"]), plan["merge"]))
    print(f"\n{scores['steps']} scoring steps, {scores['informative_steps']} informative "
          "(step 1 carries no signal: LoRA's B starts at zero)")
    print(plan_summary(plan))
    print(f"\n{'':22}{'dense':>14}{'pruned':>14}{'ratio':>8}")
    print(f"{'parameters':22}{n_dense:>14,}{n_pruned:>14,}{n_pruned / n_dense:>8.3f}")
    print(f"{'decoder layers':22}{dense.config.num_hidden_layers:>14}{pruned.config.num_hidden_layers:>14}"
          f"{pruned.config.num_hidden_layers / dense.config.num_hidden_layers:>8.3f}")
    print(f"{'held-out loss':22}{loss_dense:>14.4f}{loss_pruned:>14.4f}{loss_pruned / loss_dense:>8.3f}")
    print("\nNo recovery fine-tuning was run: until it is fine-tuned the pruned model's loss is expected to be far\n"
          "above the dense model's (see README, 'What to expect').")
    print(f"outputs in {out}/ (scores/, plan.json, pruned/), {time.time() - t0:.0f} s in all")
    return {"loss_dense": loss_dense, "loss_pruned": loss_pruned, "params_dense": n_dense, "params_pruned": n_pruned}
