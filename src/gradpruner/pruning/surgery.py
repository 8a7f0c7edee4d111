"""Remove decoder layers from a loaded causal LM in place (``models.loading.save_model`` saves it).

The traps, each handled below: kept attention modules must be renumbered (the KV cache is indexed
by ``layer_idx`` and sized by ``num_hidden_layers``); the config's per-layer lists must shrink with
the layers (see ``architectures.subset_config``); every module that holds the config must see the
new one; model-level state derived from the layer types at init must be recomputed.
"""
from __future__ import annotations

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models.architectures import (
    find_decoder_layers,
    subset_config,
    validate_keep,
)


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


def move_mlp_blocks(model, mlp_from: dict) -> None:
    """Give each kept layer ``int(k)`` the MLP block of layer ``mlp_from[k]`` (a block plan,
    ``planning.blocks``), in place: the MLP module and the norms that go with it (``models.blocks``).
    Call before ``remove_layers``; the layers whose blocks were taken are removed by it."""
    from gradpruner.models.blocks import layer_mlp_side

    if not mlp_from:
        return
    _, _, layers = find_decoder_layers(model)
    side = layer_mlp_side(model)
    for key, src in mlp_from.items():
        dst = int(key)
        for name in side:
            mine, theirs = getattr(layers[dst], name), getattr(layers[src], name)
            shapes = [tuple(p.shape) for p in mine.parameters()], [tuple(p.shape) for p in theirs.parameters()]
            if type(mine) is not type(theirs) or shapes[0] != shapes[1]:
                raise GradPrunerError(f"Layer {src}'s {name} differs from layer {dst}'s in kind or shape, so it cannot "
                                      "take its place; use plan.granularity layer for this model.")
            setattr(layers[dst], name, theirs)


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
