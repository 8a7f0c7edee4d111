"""The layer-selection methods by name, without their code: how each runs and one line about it.

This module imports nothing heavy, so the CLI's ``score --help`` lists the methods without importing
torch; ``scoring.methods.METHODS`` pairs every entry here with its function (one definition of each).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """A layer-selection method's description. ``kind`` says how it runs: ``igia`` — a score rule of the
    IGIA of T early LoRA steps; ``variant`` — an IGIA variant, the same steps plus statistics of the model
    (``scoring.variants``); ``direct`` — a function of ``scoring.methods`` computes the scores."""

    trains: bool        # runs optimizer steps (costs like fine-tuning)
    factors: bool       # writes igia.safetensors (needed by the IGIA merge rules)
    about: str          # one line for ``gradpruner score --help``
    kind: str = "direct"

    @property
    def lora_steps(self) -> bool:
        """Whether it trains LoRA on the task and captures its gradients (the IGIA path)."""
        return self.kind != "direct"


CATALOG: dict[str, MethodInfo] = {
    "igia": MethodInfo(True, True, "the paper: Σ F_W of T early LoRA steps (Eq. 2–4)", "igia"),
    "igia_norm": MethodInfo(True, True, "the authors' release: unsquared ‖G‖_F summed over steps", "igia"),
    "igia_saliency": MethodInfo(True, True, "Σ F ⊙ W² (expected loss change of zeroing the weights)", "variant"),
    "igia_log": MethodInfo(True, True, "mean over a layer's modules of log Σ F", "variant"),
    "igia_typerank": MethodInfo(True, True, "per module type, rank the layers by Σ F; average the ranks", "variant"),
    "igia_gradnorm": MethodInfo(True, True, "Σ F divided by the mean ‖∂L/∂out‖² at the layer", "variant"),
    "igia_scaled": MethodInfo(True, True, "Σ F times the mean square of the layer's input stream", "variant"),
    "igia_guarded": MethodInfo(True, True, "IGIA chooses among the layers block influence lets go (pool prune + ⌈prune/3⌉)", "variant"),
    "igia_guarded_loss": MethodInfo(True, True, "IGIA chooses among the layers whose removal alone costs least", "variant"),
    "igia_greedy": MethodInfo(True, True, "greedy removal by measured loss among the ⌈f·prune⌉ lowest-IGIA layers", "variant"),
    "full_grad": MethodInfo(True, False, "Eq. 3–4 on true dense-weight gradients (T full FT steps)"),
    "block_influence": MethodInfo(False, False, "ShortGPT: 1 − cos(input, output) per layer"),
    "taylor": MethodInfo(False, False, "Σ |W ⊙ ∇W| per layer on task data (LLM-Pruner's first order)"),
    "removal_taylor": MethodInfo(False, False, "|∂L/∂out · (out − in)| per layer: first-order loss change of removing it"),
    "removal_loss": MethodInfo(False, False, "Shortened LLaMA: calibration-loss increase when the layer alone is removed"),
    "greedy_loss": MethodInfo(False, False, "remove one layer at a time, the cheapest by measured calibration loss (SLEB)"),
    "magnitude": MethodInfo(False, False, "Σ |W| per layer"),
    "last_n": MethodInfo(False, False, "drop the top layers"),
    "random": MethodInfo(False, False, "seeded random ranking"),
    "laco": MethodInfo(False, False, "LaCo layer collapse (merge with prune.merge_rule laco)"),
}


def methods_help() -> str:
    """The methods and their one-line descriptions, as ``gradpruner score --help`` lists them."""
    width = max(map(len, CATALOG))
    return "methods (--method):\n" + "\n".join(f"  {name:<{width}}  {m.about}" for name, m in CATALOG.items())
