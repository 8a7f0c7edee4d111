"""Pruning plans: which decoder layers stay, which go, and which of those are merged into which.

A plan is plain JSON data, so a person can read it, edit it or write one by hand::

    {"num_layers": 32,
     "keep": [0, 1, ..., 17, 31],            # sorted
     "drop": [18, 19, ..., 30],              # sorted; every removed layer, merged ones included
     "merge": {"18": 17, "19": 17, "30": 17},  # removed layer (JSON key, a string) -> kept target
     "layer_scores": [...],                   # the scores it came from, or null when hand-written
     "params": {"total_before": ..., "total_after": ..., "removed_fraction": ...},  # optional
     "rule": "..."}                           # how it was made, for the reader

Only ``num_layers``, ``keep`` and ``drop`` are required; ``merge`` defaults to no merges. Any other key
is carried along untouched, except one that looks like a misspelt plan key, which is an error.
"""
from __future__ import annotations

import copy
import difflib
import math
import numbers
import re
from collections import Counter

from gradpruner.errors import GradPrunerError
from gradpruner.planning.blocks import mlp_from_problems

REQUIRED_KEYS = ("num_layers", "keep", "drop")
OPTIONAL_KEYS = ("merge", "layer_scores", "params", "rule", "granularity", "hidden", "mlp_from", "removed_blocks")


def _is_int(x) -> bool:
    # bool is an int subclass; True as a layer index is a mistake, not layer 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _ranking(layer_scores) -> list[int]:
    """Layer indices from least to most important: by score, then lower index first on a tie."""
    return sorted(range(len(layer_scores)), key=lambda i: (layer_scores[i], i))


def _check_scores(layer_scores) -> list[float]:
    if not isinstance(layer_scores, (list, tuple)) or not layer_scores:
        raise GradPrunerError("layer_scores must be a non-empty list with one score per decoder layer.")
    bad = [i for i, s in enumerate(layer_scores) if not _is_real(s) or not math.isfinite(s)]
    if bad:
        raise GradPrunerError(
            f"layer_scores has non-finite or non-numeric values at layers {_fmt_list(bad)}; "
            "rerun scoring (a NaN/inf score usually means the early LoRA steps diverged).")
    return [float(s) for s in layer_scores]


def _check_params(layer_params, total_params, num_layers: int) -> int:
    """Validate parameter counts; returns the total before pruning."""
    if (not isinstance(layer_params, (list, tuple)) or len(layer_params) != num_layers
            or not all(_is_int(p) and p >= 0 for p in layer_params)):
        raise GradPrunerError(
            f"layer_params must list {num_layers} non-negative integers, one per decoder layer.")
    if total_params is None:
        return sum(layer_params)
    if not _is_int(total_params) or total_params < sum(layer_params) or total_params <= 0:
        raise GradPrunerError(
            "total_params must be a positive integer at least the sum of layer_params "
            "(the whole model's parameter count, embeddings included).")
    return total_params


def _nearest_target(src: int, keep: list[int]) -> int:
    """The nearest kept layer before ``src``; if none precedes it, the nearest one after."""
    before = [k for k in keep if k < src]
    return max(before) if before else min(k for k in keep if k > src)


def _constrained_order(order: list[int], n: int, prune: int, protect_last: int, max_block: int | None) -> list[int]:
    """The ranking with the layers that may not be removed moved behind the first ``prune``.

    Walk the ranking from the least important layer; skip a layer among the last ``protect_last``
    or one whose removal would make a run of more than ``max_block`` consecutive removed layers."""
    if protect_last == 0 and max_block is None:
        return order
    chosen: set[int] = set()
    for j in order:
        if len(chosen) == prune:
            break
        if j >= n - protect_last:
            continue
        if max_block is not None:
            lo = hi = j
            while lo - 1 in chosen:
                lo -= 1
            while hi + 1 in chosen:
                hi += 1
            if hi - lo + 1 > max_block:
                continue
        chosen.add(j)
    if len(chosen) < prune:
        raise GradPrunerError(f"No {prune} layers can be removed with protect_last {protect_last} and max_block "
                              f"{max_block} in a {n}-layer model; relax the constraints or remove fewer layers.")
    picked = [j for j in order if j in chosen]
    return picked + [j for j in order if j not in chosen]


def make_plan(layer_scores: list[float], prune: int, merge: int = 0,
              layer_params: list[int] | None = None, total_params: int | None = None,
              protect_last: int = 0, max_block: int | None = None) -> dict:
    """The GradPruner paper's plan rule (Section 3.1, Layer Pruning): remove the lowest-scoring layers.

    Rank layers by score ascending, ties broken by the lower index first (so at equal scores the
    earlier layer counts as less important; the plan is deterministic). Drop the first ``prune`` of
    that ranking. Of the dropped layers, the ``merge`` last in the ranking (the highest-scoring) are
    merged into the nearest *preceding* kept layer, or, if no kept layer precedes one, into the
    nearest following kept layer. ``params`` is filled in when ``layer_params`` is given:
    total_before = total_params (default Σ layer_params), total_after = total_before − Σ_dropped
    layer_params, removed_fraction = (total_before − total_after) / total_before.

    Constraints (off by default, the paper has none): never remove the last ``protect_last``
    layers; never remove more than ``max_block`` consecutive layers.
    """
    scores = _check_scores(layer_scores)
    n = len(scores)
    if not _is_int(prune) or prune < 0:
        raise GradPrunerError(f"--prune must be a non-negative integer (got {prune!r}).")
    if prune >= n:
        raise GradPrunerError(
            f"--prune {prune} would remove every layer of a {n}-layer model; at least one layer "
            f"must stay, so use at most {n - 1}.")
    if not _is_int(merge) or merge < 0:
        raise GradPrunerError(f"--merge must be a non-negative integer (got {merge!r}).")
    if merge > prune:
        raise GradPrunerError(
            f"--merge {merge} is larger than --prune {prune}; merged layers are chosen among the "
            f"pruned ones, so use at most {prune}.")
    if not _is_int(protect_last) or not 0 <= protect_last < n or (
            max_block is not None and (not _is_int(max_block) or max_block < 1)):
        raise GradPrunerError(f"protect_last must be in 0..{n - 1} and max_block a positive integer or null "
                              f"(got {protect_last!r}, {max_block!r}).")
    order = _constrained_order(_ranking(scores), n, prune, protect_last, max_block)
    drop = sorted(order[:prune])
    keep = sorted(order[prune:])
    merged = order[prune - merge:prune]
    plan = {
        "num_layers": n,
        "keep": keep,
        "drop": drop,
        "merge": {str(s): _nearest_target(s, keep) for s in sorted(merged)},
        "layer_scores": scores,
        "rule": (f"drop the {prune} lowest-scoring layers (ties: lower index first); merge the "
                 f"{merge} highest-scoring of them into the nearest preceding kept layer "
                 "(the nearest following one if none precedes)"
                 + (f"; never the last {protect_last} layers" if protect_last else "")
                 + (f"; at most {max_block} consecutive layers" if max_block else "")),
    }
    if layer_params is not None:
        before = _check_params(layer_params, total_params, n)
        after = before - sum(layer_params[i] for i in drop)
        plan["params"] = {"total_before": before, "total_after": after,
                          "removed_fraction": (before - after) / before if before else 0.0}
    return plan


def layers_for_target(layer_scores: list[float], layer_params: list[int], total_params: int,
                      fraction: float) -> int:
    """Smallest N such that removing the N lowest-ranked layers removes ≥ fraction · total_params.

    The ranking is make_plan's (score ascending, lower index first on ties), so
    ``make_plan(scores, layers_for_target(...))`` removes at least the requested fraction.
    """
    scores = _check_scores(layer_scores)
    total = _check_params(layer_params, total_params, len(scores))
    if not _is_real(fraction) or not 0 < fraction < 1:
        raise GradPrunerError(f"--target-params must be between 0 and 1, exclusive (got {fraction!r}).")
    removed = 0
    order = _ranking(scores)
    for n, layer in enumerate(order[:-1], start=1):
        removed += layer_params[layer]
        if removed >= fraction * total:
            return n
    raise GradPrunerError(
        f"--target-params {fraction} cannot be reached: removing all but one layer removes only "
        f"{removed / total:.4f} of the parameters; ask for at most that.")


def _fmt_list(xs, limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in list(xs)[:limit])
    return shown + (f", … ({len(xs)} in all)" if len(xs) > limit else "")


def _index_list(plan: dict, key: str, problems: list[str]) -> list[int] | None:
    value = plan[key]
    if not isinstance(value, list):
        problems.append(f"Plan key {key!r} must be a list of layer indices, not {type(value).__name__}.")
        return None
    bad = [x for x in value if not _is_int(x)]
    if bad:
        problems.append(f"Plan key {key!r} holds non-integer layer indices {_fmt_list(bad)}; "
                        "write each layer as a whole number.")
    ints = [x for x in value if _is_int(x)]
    dups = sorted(x for x, c in Counter(ints).items() if c > 1)
    if dups:
        problems.append(f"Plan key {key!r} lists layers {_fmt_list(dups)} more than once.")
    return ints


def _merge_map(plan: dict, problems: list[str]) -> dict[int, int] | None:
    value = plan.get("merge", {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append("Plan key 'merge' must map removed layers to kept layers, "
                        f'like {{"18": 17}}, not {type(value).__name__}.')
        return None
    out = {}
    for key, target in value.items():
        if _is_int(key):
            src = key
        elif isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key.strip()):
            src = int(key)
        else:
            problems.append(f"Plan 'merge' key {key!r} is not a layer index; write it like \"18\".")
            continue
        if not _is_int(target):
            problems.append(f"Plan 'merge' sends layer {src} to {target!r}, which is not a layer index.")
            continue
        if src in out:
            problems.append(f"Plan 'merge' lists layer {src} more than once.")
            continue
        out[src] = target
    return out


def validate_plan(plan: dict, num_layers: int | None = None) -> dict:
    """Check a plan (hand-written or made here) and return it normalised.

    Every problem found is reported at once, one sentence each. ``num_layers`` is the model's
    layer count, when known. The result has sorted ``keep``/``drop``, ``merge`` keyed by strings in
    source order, and the other keys copied. Never raises anything but GradPrunerError.
    """
    if not isinstance(plan, dict):
        raise GradPrunerError(f"A plan must be a JSON object with keys {', '.join(REQUIRED_KEYS)}, "
                              f"not {type(plan).__name__}.")
    problems: list[str] = []
    known = REQUIRED_KEYS + OPTIONAL_KEYS
    for key in plan:
        if key not in known and isinstance(key, str):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            if close:
                problems.append(f"Plan key {key!r} is not a plan key; did you mean {close[0]!r}?")
    missing = [k for k in REQUIRED_KEYS if k not in plan]
    if missing:
        problems.append(f"The plan lacks the key(s) {', '.join(map(repr, missing))}; "
                        "a plan needs num_layers, keep and drop.")

    n = None
    if "num_layers" in plan:
        pn = plan["num_layers"]
        if not _is_int(pn) or pn < 1:
            problems.append(f"Plan 'num_layers' must be a positive integer, not {pn!r}.")
        else:
            n = pn
    if num_layers is not None and n is not None and n != num_layers:
        problems.append(f"The plan was made for a model with {n} layers, this model has "
                        f"{num_layers}; make a new plan for this model.")
    if num_layers is not None:
        n = num_layers  # range checks are against the model actually being pruned

    keep = _index_list(plan, "keep", problems) if "keep" in plan else None
    drop = _index_list(plan, "drop", problems) if "drop" in plan else None
    merge = _merge_map(plan, problems)

    if n is not None:
        for key, idx in (("keep", keep), ("drop", drop)):
            out = sorted({x for x in idx or [] if not 0 <= x < n})
            if out:
                problems.append(f"Plan {key!r} has layers {_fmt_list(out)} outside 0..{n - 1}.")
    if keep is not None and not keep:
        problems.append("Plan 'keep' is empty; at least one layer must stay.")
    if keep is not None and drop is not None:
        both = sorted(set(keep) & set(drop))
        if both:
            problems.append(f"Layers {_fmt_list(both)} are in both 'keep' and 'drop'; put each in one.")
        if n is not None:
            covered = {x for x in set(keep) | set(drop) if 0 <= x < n}
            if len(covered) < n:
                # Find the first few missing without building range(n): n may be absurdly large.
                gaps, i = [], 0
                while len(gaps) < 8 and i < n:
                    if i not in covered:
                        gaps.append(i)
                    i += 1
                more = f" ({n - len(covered)} in all)" if n - len(covered) > len(gaps) else ""
                problems.append(f"Layers {', '.join(map(str, gaps))}{more} are in neither 'keep' nor "
                                f"'drop'; every layer 0..{n - 1} must be in exactly one.")
    if merge:
        for src, dst in sorted(merge.items()):
            if drop is not None and src not in drop:
                problems.append(f"Plan 'merge' names layer {src} as a source, but it is not in 'drop'; "
                                "only removed layers can be merged.")
            if n is not None and not 0 <= dst < n:
                problems.append(f"Layer {src} merges into layer {dst}, which is outside 0..{n - 1}.")
            elif keep is not None and dst not in keep:
                problems.append(f"Layer {src} merges into layer {dst}, which is not kept "
                                "(it merges into a removed layer); pick a layer from 'keep'.")

    problems.extend(mlp_from_problems(plan, keep, drop, n))
    scores = plan.get("layer_scores")
    if scores is not None:
        if not isinstance(scores, list) or not all(_is_real(s) for s in scores):
            problems.append("Plan 'layer_scores' must be null or a list of numbers.")
        elif n is not None and len(scores) != n:
            problems.append(f"Plan 'layer_scores' has {len(scores)} entries for {n} layers.")
    params = plan.get("params")
    if params is not None and not (
            isinstance(params, dict)
            and all(_is_real(params.get(k)) for k in ("total_before", "total_after", "removed_fraction"))):
        problems.append("Plan 'params' must be null or hold numeric total_before, total_after "
                        "and removed_fraction.")
    rule = plan.get("rule")
    if rule is not None and not isinstance(rule, str):
        problems.append("Plan 'rule' must be a string describing how the plan was made.")

    if problems:
        raise GradPrunerError(*problems)
    out = {k: copy.deepcopy(v) for k, v in plan.items()}
    out.update(num_layers=n, keep=sorted(keep), drop=sorted(drop),
               merge={str(s): d for s, d in sorted(merge.items())},
               layer_scores=copy.deepcopy(scores))
    return out


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def plan_summary(plan: dict) -> str:
    """A few lines a person can read: layer counts, kept / dropped / merged layers, parameters."""
    p = validate_plan(plan)
    merge = {int(s): d for s, d in p["merge"].items()}
    lines = [
        f"Layers: {p['num_layers']} -> {len(p['keep'])} "
        f"({len(p['drop'])} removed, {len(merge)} of them merged)",
        f"Kept ({len(p['keep'])}): {_ranges(p['keep'])}",
        f"Dropped ({len(p['drop'])}): {_ranges(p['drop'])}",
        "Merged: " + (", ".join(f"{s} -> {d}" for s, d in sorted(merge.items())) or "none"),
    ]
    if p.get("mlp_from"):
        lines.append("MLP blocks moved (layer <- MLP of layer): "
                     + ", ".join(f"{k} <- {v}" for k, v in sorted(p["mlp_from"].items(), key=lambda kv: int(kv[0]))))
    hidden = p.get("hidden")
    if isinstance(hidden, dict) and isinstance(hidden.get("keep_dims"), list):
        lines.append(f"Hidden size: {hidden.get('hidden_size')} -> {len(hidden['keep_dims'])} (residual-stream "
                     f"dimensions dropped in every layer: {len(hidden.get('drop_dims', []))})")
    params = p.get("params")
    if params:
        lines.append(f"Parameters: {params['total_before']:,} -> {params['total_after']:,} "
                     f"({100 * params['removed_fraction']:.1f}% removed)")
    if p.get("rule"):
        lines.append(f"Rule: {p['rule']}")
    return "\n".join(lines)
