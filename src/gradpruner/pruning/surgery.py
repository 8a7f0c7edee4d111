"""Remove decoder layers from a loaded causal LM in place, and save the result.

The traps, each handled below: kept attention modules must be renumbered (the KV cache is indexed
by ``layer_idx`` and sized by ``num_hidden_layers``); the config's per-layer lists must shrink with
the layers (see ``architectures.subset_config``); every module that holds the config must see the
new one; model-level state derived from the layer types at init must be recomputed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gradpruner.models.architectures import find_decoder_layers, subset_config, validate_keep


def _renumber(layers: torch.nn.ModuleList) -> None:
    # Attention modules index the KV cache with layer_idx; decoder layers (Gemma) and some MLPs
    # carry it too. Anything in layer j that has an int layer_idx must now say j.
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            old = getattr(module, "layer_idx", None)
            if isinstance(old, int) and not isinstance(old, bool):
                module.layer_idx = new_idx


def _rebind_configs(model: torch.nn.Module, old, new) -> None:
    # Transformers shares one config object between the CausalLM wrapper, the base model and
    # every layer/attention module; the base model reads config.num_hidden_layers and
    # config.layer_types in forward, and generate() builds the cache from model.config.
    # Replace every reference to the old object (identity, not equality) with the new one.
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _refresh_derived_state(model: torch.nn.Module, config) -> None:
    # Qwen2/3 base models cache "any sliding layer?" at init to decide whether to build a sliding
    # mask. Gemma 3's per-layer-type rotary embedding keeps one table per type seen at init; a
    # superset is harmless (forward only asks for the types still present), so it is left alone.
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return
    for module in model.modules():
        if isinstance(getattr(module, "has_sliding_layers", None), bool):
            module.has_sliding_layers = "sliding_attention" in layer_types


def remove_layers(model, keep: list[int]):
    """Keep only the decoder layers at indices ``keep`` (sorted, unique), in place; returns ``model``.

    The kept layers are renumbered 0..len(keep)-1 and the config (a new object, see
    ``subset_config``) describes exactly them.
    """
    parent, attr, layers = find_decoder_layers(model)
    keep = validate_keep(keep, len(layers))
    old_config = model.config
    new_config = subset_config(old_config, keep)

    kept = torch.nn.ModuleList([layers[i] for i in keep])
    setattr(parent, attr, kept)
    _renumber(kept)
    _rebind_configs(model, old_config, new_config)
    _refresh_derived_state(model, new_config)
    return model


def save_model(model, tokenizer, out_dir, extra_files: dict[str, dict] | None = None) -> None:
    """Save ``model`` (safetensors), ``tokenizer`` and extra JSON files into the existing ``out_dir``.

    ``save_pretrained`` also writes ``generation_config.json`` when the model has one. A
    ``quantization_config`` (models converted from GGUF carry one) is left out of the saved config:
    the weights written are plain dequantized tensors. Atomicity is the caller's business.
    """
    out_dir = Path(out_dir)
    config = model.config
    quant = config.__dict__.pop("quantization_config", None) if "quantization_config" in vars(config) else None
    try:
        # Safetensors is the only format in transformers 5 and the default in 4.x.
        model.save_pretrained(out_dir)
    finally:
        if quant is not None:
            config.quantization_config = quant
    if not any(out_dir.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {out_dir}")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    for name, obj in (extra_files or {}).items():
        with open(out_dir / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
