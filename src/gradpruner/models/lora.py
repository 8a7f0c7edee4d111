"""Attach LoRA (or DoRA) adapters to a causal LM: the one place gradpruner calls ``get_peft_model``.

Scoring trains the adapters for a few steps and reads their gradients, fine-tuning trains and merges
them, the bench times a training step with them; all three attach them here.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

from gradpruner.errors import GradPrunerError

ADAPTERS = ("lora", "dora")


def attach_lora(model, *, rank: int, alpha: float, dropout: float, target_modules: Sequence[str],
                adapter: str = "lora", target_parameters: Sequence[str] | None = None):
    """``model`` wrapped by peft with a LoRA adapter of ``rank``/``alpha``/``dropout`` (no bias, task
    CAUSAL_LM) on the modules ``target_modules`` (full names) and, for fused mixture-of-experts weights,
    on the parameters ``target_parameters``; ``adapter="dora"`` makes it DoRA. Returns the PeftModel
    (``.unload()`` gives the base model back, ``.merge_and_unload()`` folds the adapter in).
    A string ``target_modules`` is peft's regular expression over module names."""
    from peft import LoraConfig, get_peft_model

    if adapter not in ADAPTERS:
        raise GradPrunerError(f"Adapter {adapter!r} is not known; use {' or '.join(ADAPTERS)}.")
    modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                     task_type="CAUSAL_LM", use_dora=adapter == "dora",
                     target_parameters=list(target_parameters) if target_parameters else None)
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, cfg)
