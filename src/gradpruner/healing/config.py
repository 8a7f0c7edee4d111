"""The heal stage's settings: one field per setting, its default and help (CLI, YAML and API alike)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gradpruner.util.options import opt

CHOICES = {"objective": ("l2", "cosine"), "tokens": ("all", "skip_first"), "target": ("hidden", "logits"),
           "train": ("fold", "down_proj"), "init": ("lstsq", "identity")}


@dataclass
class HealConfig:
    rule: str = opt("none", "lstsq (ReplaceMe's closed-form linear fold into the down_proj before each cut) or trained "
                    "(lstsq, then AdamW on the folds); none heals nothing: no heal stage in a run, refused by gradpruner "
                    "heal; see docs/heal.md")
    objective: str = opt("l2", "what the fit minimises: l2, or cosine (each token weighted by 1/‖dense hidden "
                         "state‖, close to a cosine objective)")
    tokens: str = opt("all", "tokens fitted and measured: all, or skip_first (leave out each example's first token, "
                      "the attention sink)")
    alpha: float = opt(1e-3, "ridge: alpha·trace(A₁ᵀA₁)/d is added to the diagonal (0: plain least squares)")
    calib_examples: int = opt(128, "task training examples the folds are fitted on")
    heldout_examples: int = opt(32, "further training examples, never fitted, on which heal.json reports the "
                                "hidden-state errors and the loss")
    max_length: int = opt(256, "tokens per example (the prompt is truncated from the left)")
    batch_size: int = opt(8, "examples per forward pass (and per optimizer step of trained)")
    steps: int = opt(50, "trained: AdamW steps")
    lr: float = opt(1e-4, "trained: learning rate (no weight decay)")
    target: str = opt("hidden", "trained: hidden (MSE to the dense hidden state after each cut) or logits (KL to the "
                      "dense model's next-token distribution)")
    train: str = opt("fold", "trained: fold (one d×d matrix per cut, folded in afterwards) or down_proj (the "
                     "down_proj weights before each cut)")
    init: str = opt("lstsq", "trained: start from the lstsq fold, or from identity (the pruned model as it is)")


def config_problems(c: HealConfig, where: str = "--") -> list[str]:
    """One sentence per bad setting (the rule's name is checked against ``HEAL_RULES`` by the caller).
    ``where`` is how a setting is named: ``--`` for flags, ``heal.`` for the run config."""
    def name(field: str) -> str:
        return where + (field.replace("_", "-") if where == "--" else field)

    out = [f"{name(k)} {getattr(c, k)!r} is not known; use {' or '.join(v)}." for k, v in CHOICES.items()
           if getattr(c, k) not in v]
    if not (isinstance(c.alpha, (int, float)) and math.isfinite(c.alpha) and c.alpha >= 0):
        out.append(f"{name('alpha')} {c.alpha!r} must be a number ≥ 0; use e.g. 1e-3.")
    for k in ("calib_examples", "heldout_examples", "max_length", "batch_size", "steps"):
        if not isinstance(getattr(c, k), int) or getattr(c, k) < 1:
            out.append(f"{name(k)} {getattr(c, k)!r} must be a whole number ≥ 1.")
    if not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
        out.append(f"{name('lr')} {c.lr!r} must be a positive number; use e.g. 1e-4.")
    return out
