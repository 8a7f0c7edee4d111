"""How much device memory each stage needs for a model, from its config alone (built on the meta device).

``stage_memory(config, dtype, stage)`` adds up, in bytes, what the stage holds at its peak:

* weights: every parameter (a tied head once) at the precision the stage holds it in — the runtime's
  dtype for eval, scoring and the frozen base of LoRA fine-tuning; float32 for weights that are trained
  (full fine-tuning); the checkpoint's own dtype for pruning in memory; one tensor at a time out of core;
* training state: float32 trainable parameters, their gradients and AdamW's two moments (16 bytes each);
* activations: what a backward pass keeps per decoder layer for a batch (the inputs of every linear,
  the attention scores of an eager kernel are not counted: sdpa/flash keep none), and the float32 logits.

These are estimates for planning a machine, not measurements: ``bench`` measures the real peak, and the
GPU check script (bench/gpu_check.py) records both side by side.
"""
from __future__ import annotations

import math

STAGES = ("eval", "score", "finetune_lora", "finetune_full", "prune_in_memory", "prune_out_of_core")
ADAM_BYTES = 16  # float32 parameter, gradient, first and second moment


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters are listed once


def lora_params(model, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA on every linear module of the decoder layers: r·(in + out) each."""
    import torch

    from gradpruner.models.architectures import find_decoder_layers

    layers = find_decoder_layers(model)[2]
    return sum(rank * (m.in_features + m.out_features) for layer in layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear))


def activation_bytes(config, batch: int, seq: int, itemsize: int) -> int:
    """What a backward pass keeps: per layer the inputs of q/k/v, o, gate/up and down projections and the
    two norms, and the float32 logits with their log-softmax."""
    text = config.get_text_config()
    h, inter, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    tokens = batch * seq
    per_layer = tokens * (6 * h + 3 * inter) * itemsize
    return text.num_hidden_layers * per_layer + 2 * tokens * vocab * 4


def stage_memory(config, dtype, stage: str, *, batch: int = 8, seq: int = 512, rank: int = 8,
                 source_dtype=None) -> dict:
    """Bytes the ``stage`` needs for a model of ``config`` held in ``dtype`` (see the module doc):
    {"weights", "training_state", "activations", "total"}."""
    from gradpruner.models.loading import meta_model

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    model = meta_model(config)
    n, item = _params(model), _itemsize(dtype)
    weights, state, acts = n * item, 0, 0
    if stage == "eval":
        acts = activation_bytes(config, batch, seq, item) // max(config.get_text_config().num_hidden_layers, 1)
    elif stage in ("score", "finetune_lora"):
        state = lora_params(model, rank) * ADAM_BYTES
        acts = activation_bytes(config, batch, seq, item)
    elif stage == "finetune_full":
        weights, state = 0, n * ADAM_BYTES
        acts = activation_bytes(config, batch, seq, item)
    elif stage == "prune_in_memory":
        weights = n * _itemsize(source_dtype or dtype)
    elif stage == "prune_out_of_core":  # one tensor read and one written at a time
        weights = 2 * max(math.prod(p.shape) for p in model.parameters()) * _itemsize(source_dtype or dtype)
    del model
    total = weights + state + acts
    return {"stage": stage, "dtype": str(dtype).removeprefix("torch."), "weights": weights, "training_state": state,
            "activations": acts, "total": total, "total_gib": round(total / 2**30, 2),
            "params": n, "batch": batch, "seq": seq, "rank": rank}
