"""IGIA variants: other ways to turn the same early-step LoRA gradients into layer scores.

The paper's score (Eq. 4) adds the IGIA-Matrix entries of a layer's seven modules. On SmolLM2 that
sum is decided by scale, not by importance: one module (layer 11's down_proj) carries 82% of the
total and the gradient of the residual stream falls ≈33× with depth, so the deepest layers look least
important. Each variant here uses the same factors (igia.safetensors) and changes one thing:

- ``igia_saliency``: expected loss change of zeroing the weights, Σ F ⊙ W² (Optimal Brain Damage with
  the IGIA-Matrix as the diagonal Fisher) instead of Σ F;
- ``igia_log``: the mean over a layer's modules of log(module score), so no single module decides;
- ``igia_typerank``: per module type (q, k, …, down) rank the layers, then average the ranks;
- ``igia_gradnorm``: the layer's Σ F divided by the mean squared norm of the residual-stream gradient
  at its output (removes the depth trend measured by the diagnosis);
- ``igia_scaled``: the layer's Σ F times the mean square of the residual stream at its input (a
  layer's update is added to a stream of that scale; pre-norm layers see gradients ∝ 1/scale).

The guards (``igia_guarded``, ``igia_guarded_loss``) let IGIA choose within a pool that a removal
measure picks; ``igia_greedy`` turns it round: IGIA picks the pool and the measured loss chooses
(``scoring.greedy``).

Every function is pure over tensors and dicts, so tests check each against a direct computation.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from gradpruner.models import architectures
from gradpruner.scoring.greedy import greedy_block_removal, greedy_removal, lowest, pool_size
from gradpruner.scoring.igia import igia_matrix, layer_scores


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def saliency(module_sq: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Σ F ⊙ W² per module, from F (``module_sq[name]``, out×in) and W (same shape)."""
    return {n: float((f.double() * weights[n].double().pow(2)).sum()) for n, f in module_sq.items()}


def log_mean(module_scores: dict[str, float], module_layer: dict[str, int], n: int) -> list[float]:
    """Mean over each layer's modules of log(score); a zero score counts as the smallest positive one."""
    floor = min((v for v in module_scores.values() if v > 0), default=1e-300)
    sums, counts = [0.0] * n, [0] * n
    for name, v in module_scores.items():
        sums[module_layer[name]] += math.log(max(v, floor))
        counts[module_layer[name]] += 1
    return [s / c if c else -math.inf for s, c in zip(sums, counts)]


def type_rank(module_scores: dict[str, float], module_layer: dict[str, int], n: int) -> list[float]:
    """For each module type rank the layers by that module's score (0 = lowest), then average the ranks."""
    by_type: dict[str, list[tuple[float, int]]] = {}
    for name, v in module_scores.items():
        by_type.setdefault(module_type(name), []).append((v, module_layer[name]))
    sums, counts = [0.0] * n, [0] * n
    for entries in by_type.values():
        for rank, (_, layer) in enumerate(sorted(entries)):
            sums[layer] += rank
            counts[layer] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts)]


def rescaled(layer_scores: list[float], scale: list[float], power: int) -> list[float]:
    """score_j · scale_j^power (power −1 divides)."""
    return [s * (c ** power) if c > 0 else 0.0 for s, c in zip(layer_scores, scale)]


# --- residual-stream statistics on calibration data ---------------------------------------------

def residual_scales(model, batches) -> dict[str, list[float]]:
    """Per layer, over real tokens: mean ‖∂L/∂out_j‖² (gradient at the layer's output) and mean
    square of its input hidden state. Weights get no gradients; only the hidden states do."""
    layers = architectures.find_decoder_layers(model)[2]
    n = len(layers)
    grad, sq, tokens, rec = [0.0] * n, [0.0] * n, 0, {}

    def pre(j):
        def hook(_m, args, kwargs):
            rec[("in", j)] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def post(j):
        def hook(_m, _args, _kwargs, output):
            t = output[0] if isinstance(output, tuple) else output
            if t.requires_grad:
                t.retain_grad()
            rec[("out", j)] = t
        return hook

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    emb = model.get_input_embeddings().register_forward_hook(lambda _m, _a, o: o.requires_grad_(True))
    handles = [emb] + [h for j, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(pre(j), with_kwargs=True),
        layer.register_forward_hook(post(j), with_kwargs=True))]
    try:
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
            m = batch["attention_mask"].bool()
            tokens += int(m.sum())
            for j in range(n):
                grad[j] += float(rec[("out", j)].grad[m].float().pow(2).sum())
                sq[j] += float(rec[("in", j)][m].float().pow(2).mean(-1).sum())
            rec.clear()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {"grad_sq": [g / tokens for g in grad], "input_ms": [s / tokens for s in sq], "tokens": tokens}


def module_matrices(factors_path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """F_W (out×in) for every module, built from the stored factors one module at a time."""
    from safetensors import safe_open

    with safe_open(str(factors_path), "pt") as f:
        return {n: igia_matrix(f.get_tensor(f"{n}.grad_B"), f.get_tensor(f"{n}.grad_A")) for n in names}


def base_weights(model, names: list[str]) -> dict[str, torch.Tensor]:
    """Each module's frozen weight (under a peft LoRA wrapper, its ``base_layer``'s)."""
    out = {}
    for n in names:
        mod = model.get_submodule(n)
        out[n] = getattr(mod, "base_layer", mod).weight.detach()
    return out


# --- guards: IGIA decides only among layers whose removal is known to be cheap --------------------

def guard_pool(prune: int, n: int) -> int:
    """How many layers the guard lets IGIA choose from: prune + ⌈prune/3⌉, at most n − 1."""
    return min(n - 1, prune + -(-prune // 3))


def guarded(igia: list[float], guard: list[float], pool: int) -> list[float]:
    """IGIA for the ``pool`` layers with the lowest guard score; every other layer ranks above all of
    them, in guard order (score = max IGIA + 1 + its guard rank), so a plan removes only pool layers."""
    order = sorted(range(len(guard)), key=lambda j: (guard[j], j))
    allowed, top = set(order[:pool]), max(igia) + 1.0
    rank = {j: r for r, j in enumerate(order)}
    return [igia[j] if j in allowed else top + rank[j] for j in range(len(igia))]


# --- the registry: (model, scores.json dict, factors path, statistics) -> layer scores -----------

Variant = Callable[[object, dict, Path, dict], list[float]]


def _saliency(model, sc, factors, _stats):
    names = list(sc["module_scores"])
    sal = {}
    for n in names:  # one module's F at a time: memory stays at one out×in matrix
        sal.update(saliency(module_matrices(factors, [n]), base_weights(model, [n])))
    return layer_scores(sal, sc["module_layer"], sc["num_layers"])


def _guarded(key):
    def fn(m, sc, f, st):
        return guarded(sc["layer_scores_by_rule"]["igia"], st[key], guard_pool(st["target"], sc["num_layers"]))
    return fn


def _igia_greedy(m, sc, f, st):
    """The greedy search by measured loss among the ⌈f·target⌉ lowest-IGIA layers, IGIA breaking ties.
    It needs IGIA, so it runs after the steps, on the model as given (the adapter unloaded, weights
    untouched): ``statistics`` leaves the calibration batches in ``st["batches"]``, which this consumes
    and ``variant_scores`` makes sure never reaches scores.json."""
    igia = sc["layer_scores_by_rule"]["igia"]
    pool = lowest(igia, pool_size(st["target"], sc["num_layers"], st["greedy_pool_factor"]))
    search = greedy_block_removal if st.pop("greedy_unit", "layer") == "block" else greedy_removal
    res = search(m, st.pop("batches"), pool, st["target"], igia, desc="igia greedy")
    st.update({k: v for k, v in res.items() if k != "layer_scores"})
    return res["layer_scores"]


# name -> (fn, statistics it needs: None, "residual", "block_influence", "removal_loss" or "greedy")
VARIANTS: dict[str, tuple[Variant, str | None]] = {
    "igia_saliency": (_saliency, None),
    "igia_log": (lambda m, sc, f, st: log_mean(sc["module_scores"], sc["module_layer"], sc["num_layers"]), None),
    "igia_typerank": (lambda m, sc, f, st: type_rank(sc["module_scores"], sc["module_layer"], sc["num_layers"]), None),
    "igia_gradnorm": (lambda m, sc, f, st: rescaled(sc["layer_scores_by_rule"]["igia"], st["grad_sq"], -1), "residual"),
    "igia_scaled": (lambda m, sc, f, st: rescaled(sc["layer_scores_by_rule"]["igia"], st["input_ms"], 1), "residual"),
    "igia_guarded": (_guarded("block_influence"), "block_influence"),
    "igia_guarded_loss": (_guarded("removal_loss"), "removal_loss"),
    "igia_greedy": (_igia_greedy, "greedy"),
}
READS_MODEL = frozenset({"igia_saliency", "igia_greedy"})  # variants that read the model after the steps
TARGETED_METHODS = ("greedy_loss",)  # direct methods whose scores depend on the count too (laco is keyed apart)


def needs_target(name: str) -> bool:
    """Methods whose scores depend on how many layers the plan removes: the guarded variants (the
    guard's pool), ``igia_greedy`` and ``greedy_loss`` (where the search stops, and its pool)."""
    return name in TARGETED_METHODS or VARIANTS.get(name, (None, None))[1] in ("block_influence", "removal_loss", "greedy")


def retarget(sc: dict, target: int) -> list[float] | None:
    """A scores.json's layer scores for removing ``target`` layers, without scoring again: the scores
    themselves when they do not depend on the count, the guard recomputed from what the file recorded for
    a guarded variant, None when only a new scoring run can tell (greedy searches, LaCo)."""
    name = sc.get("method", "igia")
    if name == "laco":
        return None
    if not needs_target(name):
        return list(sc["layer_scores"])
    key = VARIANTS.get(name, (None, None))[1]
    stats = sc.get("variant_statistics") or {}
    if key not in ("block_influence", "removal_loss") or key not in stats:
        return None
    return guarded(sc["layer_scores_by_rule"]["igia"], stats[key], guard_pool(target, sc["num_layers"]))


def statistics(name: str, ctx) -> dict | None:
    """What a variant measures on the model as given, before any training step (``ctx``: selection.Context)."""
    need = VARIANTS[name][1]
    if need is None:
        return None
    if need == "residual":
        return residual_scales(ctx.model, ctx.batches())
    from gradpruner.errors import GradPrunerError
    from gradpruner.scoring.methods import METHODS
    if ctx.target is None:
        raise GradPrunerError(f"Method {name} needs the number of layers to remove (--prune N / plan.prune) to size "
                              "its guard; give it, or use --method igia (the paper's method, whose scores do not depend on it).")
    if need == "greedy":  # measured after the steps, once IGIA names the pool: the batches are kept for it
        return {"target": ctx.target, "greedy_pool_factor": float(ctx.options.get("greedy_pool_factor", 2.0)),
                "greedy_unit": ctx.options.get("greedy_unit", "layer"),
                "batches": ctx.batches()}
    return {need: METHODS[need].fn(ctx)["layer_scores"], "target": ctx.target}


def variant_scores(name: str, model, sc: dict, factors: Path, stats: dict | None) -> list[float]:
    """One variant's layer scores for a finished IGIA run (``api.score`` with ``method=name``); what it
    measured is left in ``stats`` (for scores.json), the calibration batches taken out."""
    try:
        return VARIANTS[name][0](model, sc, factors, stats)
    finally:
        if stats is not None:
            stats.pop("batches", None)
