"""Block plans: layers whose MLP block comes from a later layer (``models.blocks``).

A block plan is a layer plan plus ``mlp_from``: kept layer (JSON key, a string) -> the removed layer whose
MLP block (with the norms that go with it) replaces the kept layer's own. ``keep`` lists the layers whose
attention stays; every other block is removed. Example: removing layer 5's MLP and layer 6's attention
gives ``keep`` [..., 5, 7, ...], ``drop`` [..., 6, ...] and ``mlp_from`` {"5": 6}.
"""
from __future__ import annotations

import re

from gradpruner.errors import GradPrunerError
from gradpruner.models.blocks import layer_pairs


def block_plan(block_order: list, prune: int, num_layers: int, layer_params: list[int] | None,
               total_params: int | None) -> dict:
    """The plan that removes the first ``prune`` block pairs of a greedy block search's ``block_order``."""
    if not isinstance(block_order, list) or len(block_order) < prune:
        have = len(block_order) if isinstance(block_order, list) else 0
        raise GradPrunerError(f"The block search recorded {have} removals, fewer than the {prune} the plan needs; "
                              f"score again with --prune {prune} (plan.prune).")
    removed = [b for unit in block_order[:prune] for b in unit]
    pairs = layer_pairs(removed, num_layers)
    keep = [a for a, _ in pairs]
    plan = {"num_layers": num_layers, "keep": keep, "drop": sorted(set(range(num_layers)) - set(keep)), "merge": {},
            "mlp_from": {str(a): m for a, m in pairs if m != a}, "granularity": "block",
            "removed_blocks": sorted(removed),
            "rule": f"remove the first {prune} attention/MLP block pairs of the greedy block search (each a whole "
                    "layer, or one layer's MLP with the next attention)"}
    if layer_params is not None:
        if len(set(layer_params)) != 1:
            raise GradPrunerError("Block granularity needs decoder layers of one size (this model's differ, e.g. "
                                  "dense and mixture-of-experts layers); use plan.granularity layer.")
        before = total_params if total_params is not None else sum(layer_params)
        after = before - prune * layer_params[0]
        plan["params"] = {"total_before": before, "total_after": after, "removed_fraction": (before - after) / before}
    return plan


def mlp_from_problems(plan: dict, keep: list[int] | None, drop: list[int] | None, n: int | None) -> list[str]:
    """What is wrong with a plan's ``mlp_from`` (nothing when it has none)."""
    value = plan.get("mlp_from")
    if value in (None, {}):
        return []
    if not isinstance(value, dict):
        return [f"Plan key 'mlp_from' must map kept layers to removed ones, like {{\"5\": 6}}, not {type(value).__name__}."]
    problems, kept = [], sorted(keep or [])
    for key, src in value.items():
        if not (isinstance(key, str) and re.fullmatch(r"[0-9]+", key)) or isinstance(src, bool) or not isinstance(src, int):
            problems.append(f"Plan 'mlp_from' entry {key!r}: {src!r} is not a pair of layer indices; write it like \"5\": 6.")
            continue
        layer = int(key)
        later = [k for k in kept if k > layer]
        bound = later[0] if later else n
        if layer not in kept:
            problems.append(f"Plan 'mlp_from' gives layer {layer} an MLP, but layer {layer} is not kept.")
        elif drop is not None and src not in drop:
            problems.append(f"Plan 'mlp_from' takes layer {layer}'s MLP from layer {src}, which is not removed.")
        elif not (layer < src and (bound is None or src < bound)):
            problems.append(f"Plan 'mlp_from' takes layer {layer}'s MLP from layer {src}; it must come from a removed "
                            f"layer between {layer} and the next kept layer{f' ({bound})' if bound is not None else ''}.")
    if plan.get("merge"):
        problems.append("A plan with 'mlp_from' cannot also merge layers; set merge to 0 (plan.merge) for block plans.")
    if plan.get("hidden") is not None:
        problems.append("A plan with 'mlp_from' cannot also prune the hidden size.")
    return problems
