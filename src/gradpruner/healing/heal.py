"""``heal_model``: heal a loaded pruned model against its dense original and measure what it changed.

The measurements (heal.json) are taken on held-out calibration examples the folds never saw: per cut the
relative hidden-state error ‖h_pruned − h_dense‖ / ‖h_dense‖ at the position after the cut (summed over
the measured tokens), and the whole model's loss on the completion tokens, before and after healing.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from gradpruner.data.examples import IGNORE_INDEX, PadCollator
from gradpruner.errors import GradPrunerError, lookup
from gradpruner.healing.rules import (
    HEAL_RULES,
    Cut,
    find_cuts,
    mlp_output,
    states,
    token_mask,
)


def split_features(features: list[dict], calib: int, heldout: int) -> tuple[list[dict], list[dict]]:
    """(fitted, held out): the first ``calib`` examples and the next ``heldout``; with fewer examples the
    last quarter (at most ``heldout``, at least one) is held out and the rest fitted."""
    if len(features) < 2:
        raise GradPrunerError(f"Healing needs at least 2 examples (one to fit, one to measure on); the data has "
                              f"{len(features)}.")
    held = min(heldout, max(1, len(features) // 4)) if len(features) < calib + heldout else heldout
    fit = min(calib, len(features) - held)
    return features[:fit], features[fit:fit + held]


def make_batches(features: list[dict], pad_id: int, batch_size: int, device) -> list[dict]:
    collate = PadCollator(pad_id)
    return [{k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
            for i in range(0, len(features), batch_size)]


def position(cut: Cut) -> tuple[tuple[str, int], tuple[str, int]]:
    """Where a cut's error is measured: (dense point, pruned point), the residual stream after the cut."""
    return ("out", cut.last), (("out", cut.at) if cut.at is not None else ("in", 0))


@torch.no_grad()
def hidden_errors(dense, pruned, cuts: list[Cut], batches: list[dict], tokens: str) -> list[float]:
    """‖h_pruned − h_dense‖ / ‖h_dense‖ after each cut, over the measured tokens of all batches."""
    num, den = [0.0] * len(cuts), [0.0] * len(cuts)
    dense_points = {str(k): position(c)[0] for k, c in enumerate(cuts)}
    pruned_points = {str(k): position(c)[1] for k, c in enumerate(cuts)}
    for batch in batches:
        sel = token_mask(batch["attention_mask"], tokens)
        got_d, got_p = states(dense, batch, dense_points), states(pruned, batch, pruned_points)
        for k in range(len(cuts)):
            h_d, h_p = got_d[str(k)][sel].double(), got_p[str(k)][sel].double()
            num[k] += float(((h_p - h_d) ** 2).sum())
            den[k] += float((h_d ** 2).sum())
    return [math.sqrt(n / d) if d > 0 else None for n, d in zip(num, den)]


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    """Mean next-token cross-entropy on the completion tokens (the fine-tuning loss)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def measure(dense, pruned, cuts, batches, tokens) -> dict:
    return {"errors": hidden_errors(dense, pruned, cuts, batches, tokens) if cuts else [],
            "loss": heldout_loss(pruned, batches)}


def heal_model(dense, pruned, keep: list[int], fit: list[dict], held: list[dict], config) -> dict:
    """Heal ``pruned`` (its decoder layers are ``dense``'s layers ``keep``) in place with ``config.rule``,
    fitted on the batches ``fit``, measured on ``held``; the record that heal.json holds."""
    rule = lookup(HEAL_RULES, config.rule, "heal rule")
    cuts = find_cuts(keep, dense.config.num_hidden_layers)
    healable = [c for c in cuts if c.at is not None]
    if config.rule != "none":
        for c in healable:
            mlp_output(pruned, c.at)  # every cut can be folded, before any work
    before = measure(dense, pruned, cuts, held, config.tokens)
    done = rule(dense, pruned, healable, fit, config)
    infos = iter(done.pop("cuts"))
    after = measure(dense, pruned, cuts, held, config.tokens) if config.rule != "none" else before
    records = []
    for k, c in enumerate(cuts):
        rec = {"removed": list(c.removed), "after_layer": c.before, "pruned_layer": c.at}
        if c.at is None:
            rec.update(status="skipped", reason="no kept layer before the run (it starts the model), nothing to fold into")
        else:
            rec.update(status="healed" if config.rule != "none" else "unchanged", **next(infos))
        rec.update(error_before=before["errors"][k], error_after=after["errors"][k])
        records.append(rec)
    return {"rule": config.rule, "settings": dataclasses.asdict(config), "cuts": records, **done,
            "loss": {"dense": heldout_loss(dense, held), "before": before["loss"], "after": after["loss"]},
            "fit_examples": sum(len(b["input_ids"]) for b in fit),
            "heldout_examples": sum(len(b["input_ids"]) for b in held)}
