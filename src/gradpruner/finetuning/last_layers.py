"""The ``last_layers`` fine-tuning mode: every weight frozen except the last decoder layers and the
final norm (and, with ``head``, the output projection), as "Reassessing Layer Pruning" recovers a
pruned model: fully fine-tuning the last layers and the final norm beats LoRA of rank 8.

A model that ties ``lm_head`` to the input embeddings (SmolLM2, Gemma) holds one matrix for both, so
training the head there moves the embeddings too. Nothing is untied: the checkpoint keeps the
model's own layout and loads like any other.
"""
from __future__ import annotations

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models import architectures


def train_last_layers(model: torch.nn.Module, last: int, head: bool = False) -> list[str]:
    """Freeze ``model`` except its last ``last`` decoder layers, its final norm and, with ``head``,
    its output embeddings; returns the names of the parameters left trainable, in order."""
    _, _, layers = architectures.find_decoder_layers(model)
    if not isinstance(last, int) or isinstance(last, bool) or not 1 <= last <= len(layers):
        raise GradPrunerError(f"--train-last {last!r} is invalid for a model with {len(layers)} decoder layers; "
                              f"use a whole number from 1 to {len(layers)}.")
    keep = [*layers[len(layers) - last:], architectures.final_norm(model)[1]]
    if head:
        out = model.get_output_embeddings()
        if out is None:
            raise GradPrunerError(f"Model type {architectures.model_type(model)!r} has no output embeddings "
                                  "(lm_head) to train; drop --train-head.")
        keep.append(out)
    trained = {id(p) for m in keep for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters the optimizer updates; a tensor shared by two modules (tied embeddings) counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
