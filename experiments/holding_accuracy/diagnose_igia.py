"""Why does IGIA rank SmolLM2-135M's layers almost by depth, and what does its plan cost?

Writes a PNG per item and ``diagnosis.json`` under --out, and prints a summary:
1. concentration: the layer score is a sum over modules, so one huge module decides a layer's rank;
2. step profile: F is a mean over steps, step 1 is 0 (LoRA B starts at 0), so a few steps carry it;
3. depth law: grad_B and grad_A are each linear in the residual gradient ∂L/∂h of their layer, so
   ‖G‖² would scale like ‖∂L/∂h‖⁴ (fit of log score on log ‖∂L/∂h_j‖; the first guess was b ≈ 4);
4. agreement with the other scoring runs stored under --store;
5. damage of each plan (layers skipped, no merging) on the dense model: loss and hidden cosine.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/holding_accuracy/diagnose_igia.py
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TYPES = ["q", "k", "v", "o", "gate", "up", "down"]
LABELS = {"grad": "mean ‖∂L/∂h_j‖ (layer output)", "rms": "mean RMS of layer input",
          "down_rms": "mean RMS of down_proj input", "down_max": "max |down_proj input|"}


def concentration(module_scores: dict, module_layer: dict, n_layers: int) -> dict:
    """Shares of the total IGIA score: a total carried by a few modules is no measure of a layer."""
    total = sum(module_scores.values())
    top = sorted(module_scores.items(), key=lambda kv: -kv[1])
    grid = np.zeros((len(TYPES), n_layers))
    for name, s in module_scores.items():
        grid[TYPES.index(name.rsplit(".", 1)[-1].removesuffix("_proj")), module_layer[name]] += s
    return {"total": total, "top10": [{"module": m, "share": s / total} for m, s in top[:10]],
            "largest_share": top[0][1] / total,
            "type_share": {t: grid[i].sum() / total for i, t in enumerate(TYPES)}, "grid": grid.tolist()}


def step_profile(step_layer: list, losses: list) -> dict:
    """Per-step totals: IGIA averages over steps, so one outsized step can set the whole ranking."""
    totals = np.array(step_layer).sum(1)
    return {"totals": totals.tolist(), "zero_steps": [int(i) + 1 for i in np.flatnonzero(totals == 0)],
            "top_step": int(totals.argmax()) + 1, "top_step_share": float(totals.max() / totals.sum()),
            "max_over_median": float(totals.max() / np.median(totals[totals > 0])), "losses": losses}


def fit_loglog(x, y) -> dict:
    """Least-squares slope b and R² of log y = a + b log x (the first guess was b ≈ 4)."""
    lx, ly = np.log(np.asarray(x)), np.log(np.asarray(y))
    b, a = np.polyfit(lx, ly, 1)
    return {"a": float(a), "b": float(b), "r2": float(1 - (ly - a - b * lx).var() / ly.var()), "n": len(lx)}


def make_batches(tok, n_batches: int, size: int = 8) -> list[dict]:
    """Fixed ARC-Easy train batches, the data the IGIA scores were computed on."""
    from gradpruner.data.examples import PadCollator, load_examples, tokenize
    ex = load_examples(task="arc_easy", split="train", seed=0)[:n_batches * size]
    collate = PadCollator(tok.pad_token_id)
    return [collate(tokenize(ex[i:i + size], tok, max_length=384)) for i in range(0, len(ex), size)]


def attach_probes(model) -> tuple[dict, list]:
    """Hooks keeping each layer's output (grad retained), its input and its down_proj input.

    Weights are frozen and only the embedding output requires grad, so backward skips weight grads.
    """
    rec, hs = {"out": {}, "in": {}, "down": {}}, []
    model.requires_grad_(False)
    hs.append(model.model.embed_tokens.register_forward_hook(lambda _m, _a, o: o.requires_grad_(True)))

    def keep(kind, j):
        def hook(_m, args, extra):  # extra: the output (forward hook) or the kwargs (pre-hook)
            if kind == "out":
                t = extra[0] if isinstance(extra, tuple) else extra
                t.retain_grad()
            else:
                t = (args[0] if args else extra["hidden_states"]).detach()
            rec[kind][j] = t
        return hook

    for j, layer in enumerate(model.model.layers):
        hs += [layer.register_forward_hook(keep("out", j)),
               layer.register_forward_pre_hook(keep("in", j), with_kwargs=True),
               layer.mlp.down_proj.register_forward_pre_hook(keep("down", j), with_kwargs=True)]
    return rec, hs


def residual_stats(model, batches) -> dict:
    """Per layer over real tokens: mean ‖∂L/∂h_j‖ of its output, mean RMS of its input, and mean RMS
    and max |x| of its down_proj input (a massive activation there inflates grad_A, hence G)."""
    rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
    n, acc, tokens = len(model.model.layers), {}, 0
    rec, hs = attach_probes(model)
    try:
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
            m = batch["attention_mask"].bool()
            tokens += int(m.sum())
            for k, f in (("grad", lambda j: rec["out"][j].grad[m].norm(dim=-1).sum()),
                         ("rms", lambda j: rms(rec["in"][j][m]).sum()),
                         ("down_rms", lambda j: rms(rec["down"][j][m]).sum())):
                acc[k] = acc.get(k, 0) + np.array([f(j).item() for j in range(n)])
            acc["down_max"] = np.maximum(acc.get("down_max", 0), [rec["down"][j][m].abs().max().item() for j in range(n)])
    finally:
        for h in hs:
            h.remove()
    return {**{k: (v / (1 if k == "down_max" else tokens)).tolist() for k, v in acc.items()}, "tokens": tokens}


def skipped_run(model, batches, drop: set[int]) -> tuple[list, list[float]]:
    """Final (post-norm) hidden states and LM losses with ``drop`` layers skipped, weights untouched:
    without merging, this isolates what the choice of layers costs before any fine-tuning."""
    import torch

    from gradpruner.models.architectures import only_layers
    final = []
    hook = model.model.norm.register_forward_hook(lambda _m, _a, o: final.append(o.detach()))
    try:
        with only_layers(model, [i for i in range(len(model.model.layers)) if i not in drop]), torch.no_grad():
            losses = [model(**b, use_cache=False).loss.item() for b in batches]
    finally:
        hook.remove()
    return final, losses


def removal_damage(model, batches, plans: dict[str, set[int]]) -> dict:
    """Mean per-token cosine(dense, skipped) of the final hidden states, and mean loss, per plan."""
    from torch.nn.functional import cosine_similarity as cos
    dense, dense_loss = skipped_run(model, batches, set())
    out = {"dense": {"loss": float(np.mean(dense_loss)), "cosine": 1.0, "drop": []}}
    for name, drop in plans.items():
        final, losses = skipped_run(model, batches, drop)
        masks = [b["attention_mask"].bool() for b in batches]
        c = [cos(d[m], f[m], dim=-1).mean().item() for d, f, m in zip(dense, final, masks)]
        out[name] = {"loss": float(np.mean(losses)), "cosine": float(np.mean(c)), "drop": sorted(drop)}
    return out


def split_longest_run(name: str, drop: set[int]) -> dict[str, set[int]]:
    """The plan's longest run of consecutive layers, and the rest: which part does the damage?"""
    runs, cur = [], []
    for j in sorted(drop):
        cur = cur + [j] if cur and j == cur[-1] + 1 else [j]
        runs.append(list(cur))
    block = set(max(runs, key=len)) if runs else set()
    return {f"{name}: run {min(block)}-{max(block)} only": block, f"{name}: without that run": drop - block} if block else {}


def other_methods(store: Path, task: str) -> dict[str, list[float]]:
    """Layer scores of every non-IGIA scoring run on ``task``; a method run twice gets its key appended."""
    runs = []
    for path in sorted(store.glob("score-*/scores/scores.json"), key=lambda q: q.stat().st_mtime):
        d = json.loads(path.read_text())
        if d.get("task") == task and d.get("method") not in (None, "igia") and d.get("layer_scores"):
            runs.append((d["method"], path.parts[-3].removeprefix("score-")[:6], d["layer_scores"]))
    count = {m: sum(r[0] == m for r in runs) for m, _, _ in runs}
    return {(m if count[m] == 1 else f"{m}@{key}"): s for m, key, s in runs}


def agreement(igia: list[float], others: dict, k: int) -> tuple[dict, dict]:
    """Spearman with IGIA and overlap of the k removed (lowest) layers, ties to the lower index."""
    from scipy.stats import spearmanr

    from gradpruner.scoring.sensitivity import select
    plans = {"igia": select(igia, k, "bottom"), **{m: select(s, k, "bottom") for m, s in others.items()}}
    stats = {m: {"spearman": float(spearmanr(igia, s).statistic), "overlap": len(plans[m] & plans["igia"])}
             for m, s in others.items()}
    return stats, plans


# ------------------------------------------------------------------ figures (one per item)
def save(fig, path):
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def fig_concentration(conc, path):
    grid = np.log10(np.maximum(np.array(conc["grid"]), 1e-30))
    fig, ax = plt.subplots(figsize=(11, 3.2))
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=max(grid.min(), -12))
    ax.set(yticks=range(len(TYPES)), yticklabels=TYPES, xticks=range(grid.shape[1]), xlabel="layer",
           title=f"log10 IGIA score, layer x module type (largest module: {conc['largest_share']:.0%} of total)")
    fig.colorbar(im, ax=ax, label="log10 score"), save(fig, path)


def fig_steps(st, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    totals, steps = np.array(st["totals"]), np.arange(1, len(st["totals"]) + 1)
    a.semilogy(steps[totals > 0], totals[totals > 0], "o-", ms=3)
    for s in st["zero_steps"]:
        a.axvline(s, color="r", ls=":"), a.annotate(f"step {s}: 0", (s, totals[totals > 0].min()), color="r")
    a.set(xlabel="step", ylabel="Σ_layers Σ‖G_i‖²", title=f"IGIA per-step total (step {st['top_step']}: "
          f"{st['top_step_share']:.0%} of the sum)")
    b.plot(np.arange(1, len(st["losses"]) + 1), st["losses"], "o-", ms=3)
    b.set(xlabel="step", ylabel="loss", title="LoRA scoring loss"), save(fig, path)


def fig_residual(stats, scores, fit, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for key in LABELS:
        a.semilogy(stats[key], "o-", ms=3, label=LABELS[key])
    a.set(xlabel="layer", title="residual gradient and activations vs depth"), a.legend(fontsize=8)
    g = np.array(stats["grad"])
    b.loglog(g, scores, "o")
    for j, (x, y) in enumerate(zip(g, scores)):
        b.annotate(str(j), (x, y), fontsize=7)
    xs = np.geomspace(g.min(), g.max())
    b.loglog(xs, np.exp(fit["a"]) * xs ** fit["b"], "r-", label=f"b={fit['b']:.2f}, R²={fit['r2']:.2f}")
    b.set(xlabel="mean ‖∂L/∂h_j‖", ylabel="IGIA layer score", title="log score vs log grad norm")
    b.legend(), save(fig, path)


def fig_plans(plans, n_layers, path):
    grid = np.array([[i in plan for i in range(n_layers)] for plan in plans.values()], dtype=float)
    fig, ax = plt.subplots(figsize=(11, 0.8 + 0.45 * len(plans)))
    ax.imshow(grid, cmap="Greys", aspect="auto", vmin=0, vmax=1.4)
    ax.set(yticks=range(len(plans)), yticklabels=list(plans), xticks=range(n_layers), xlabel="layer",
           title="layers removed by each method (dark)"), save(fig, path)


def fig_damage(damage, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, key, title in ((a, "loss", "mean LM loss, layers skipped"), (b, "cosine", "final hidden cosine to dense")):
        ax.bar(list(damage), [v[key] for v in damage.values()]), ax.set(title=title)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    save(fig, path)


# -------------------------------------------------------------------------------------- main
def model_part(d: dict, args) -> dict:
    """Items 3-5: need the dense model and a few ARC-Easy batches."""
    import torch

    from gradpruner.models.loading import load_model, load_tokenizer, resolve_model
    torch.manual_seed(0)
    src = resolve_model("smollm2-135m")
    model, tok = load_model(src), load_tokenizer(src)
    batches, scores = make_batches(tok, args.batches), np.array(d["layer_scores"])
    stats = residual_stats(model, batches)
    fit = fit_loglog(stats["grad"], scores)
    big = scores > 10 * np.median(scores)  # layers carried by one outsized module
    fit_wo = {**fit_loglog(np.array(stats["grad"])[~big], scores[~big]), "excluded": np.flatnonzero(big).tolist()}
    fig_residual(stats, scores, fit, args.out / "3_residual_grad.png")
    agree, plans = agreement(d["layer_scores"], other_methods(args.store, d["task"]), args.drop)
    fig_plans(plans, d["num_layers"], args.out / "4_plans.png")
    damage = removal_damage(model, batches, {**plans, **split_longest_run("igia", plans["igia"])})
    fig_damage(damage, args.out / "5_damage.png")
    return {"residual": {**stats, "fit": fit, "fit_without_outliers": fit_wo}, "agreement": agree,
            "plans": {m: sorted(s) for m, s in plans.items()}, "damage": damage}


def summary(r) -> str:
    c, f, fw, st = r["concentration"], r["residual"]["fit"], r["residual"]["fit_without_outliers"], r["steps"]
    lines = [f"largest module {c['top10'][0]['module']}: {c['largest_share']:.1%} of total IGIA",
             "top 10: " + ", ".join(f"{t['module'].replace('model.layers.', 'L')} {t['share']:.2%}" for t in c["top10"]),
             "type shares: " + ", ".join(f"{t} {s:.2%}" for t, s in c["type_share"].items()),
             f"zero steps: {st['zero_steps']}; step {st['top_step']} holds {st['top_step_share']:.1%} of the "
             f"step sum ({st['max_over_median']:.0f}x the median step)",
             f"log score ~ log|dL/dh|: b = {f['b']:.2f}, R² = {f['r2']:.2f} (n={f['n']}); "
             f"without layers {fw['excluded']}: b = {fw['b']:.2f}, R² = {fw['r2']:.2f}"]
    lines += [f"{m}: spearman {a['spearman']:+.3f}, overlap {a['overlap']}/{len(r['plans']['igia'])}"
              for m, a in r["agreement"].items()]
    lines += [f"skip {m}: loss {v['loss']:.2f}, cosine {v['cosine']:.3f}" for m, v in r["damage"].items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", type=Path, default=Path("results/smollm2_arc_easy/scores"))
    p.add_argument("--out", type=Path, default=Path("results/diagnosis"))
    p.add_argument("--store", type=Path, default=Path("results/store"))
    p.add_argument("--batches", type=int, default=2, help="batches of 8 ARC-Easy train examples")
    p.add_argument("--drop", type=int, default=12, help="layers each plan removes")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    d = json.loads((args.scores / "scores.json").read_text())
    conc = concentration(d["module_scores"], d["module_layer"], d["num_layers"])
    steps = step_profile(d["step_layer_sq_norms"], d["losses"])
    fig_concentration(conc, args.out / "1_concentration.png"), fig_steps(steps, args.out / "2_steps.png")
    result = {"concentration": {k: v for k, v in conc.items() if k != "grid"}, "steps": steps, **model_part(d, args)}
    (args.out / "diagnosis.json").write_text(json.dumps(result, indent=2))
    print(summary(result))


if __name__ == "__main__":
    main()
