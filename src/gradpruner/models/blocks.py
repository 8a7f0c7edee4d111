"""Attention and MLP blocks: a decoder-only model as the sequence A0 M0 A1 M1 … of its sub-layer blocks.

Block ``2·i`` is layer i's attention (with the norms that go with it), block ``2·i + 1`` its MLP. Removing
blocks keeps a standard checkpoint only when what remains still alternates attention, MLP, attention, … :
each layer of the pruned model is then one attention block and the MLP block that follows it, and a layer
whose MLP comes from a later layer is a plain layer of the same architecture. So blocks are removed in
adjacent pairs of what remains (``units``): a whole layer (A_i M_i), or the MLP of one layer with the
attention after it (M_i A_j), the finer cut that BlockPruner / FinerCut search at layer granularity's
parameter cost. Attention alone cannot be removed: neither transformers, vLLM nor llama.cpp has a standard
layer without attention.
"""
from __future__ import annotations

import contextlib

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models.architectures import find_decoder_layers, model_type, only_layers

ATTENTION_SIDE = {"self_attn", "input_layernorm", "resid_attn_dropout"}
MLP_SIDE = {"mlp", "block_sparse_moe", "feed_forward", "pre_feedforward_layernorm", "post_feedforward_layernorm",
            "resid_mlp_dropout"}


def mlp_side(children, arch: str = "this model") -> set[str]:
    """Of a decoder layer's top-level child names, those that travel with its MLP block.

    ``post_attention_layernorm`` normalises the MLP's input in Llama-style layers, but the attention's
    output in Gemma's sandwich layers (which have a ``pre_feedforward_layernorm`` for the MLP)."""
    children = set(children)
    sandwich = "pre_feedforward_layernorm" in children
    out, unknown = set(), []
    for name in sorted(children):
        if name == "post_attention_layernorm":
            if not sandwich:
                out.add(name)
        elif name in MLP_SIDE:
            out.add(name)
        elif name not in ATTENTION_SIDE:
            unknown.append(name)
    if unknown:
        raise GradPrunerError(f"Block granularity does not know whether {', '.join(unknown)} in {arch}'s decoder "
                              "layers belongs to the attention or the MLP block; use plan.granularity layer.")
    if not out or "self_attn" not in children:
        raise GradPrunerError(f"{arch}'s decoder layers have no self_attn and MLP blocks to separate; use "
                              "plan.granularity layer.")
    return out


def layer_mlp_side(model) -> set[str]:
    """``mlp_side`` of the model's decoder layers (all alike)."""
    _, _, layers = find_decoder_layers(model)
    return mlp_side((name for name, _ in layers[0].named_children()), model_type(model))


def units(remaining: list[int]) -> list[tuple[int, int]]:
    """The removable units of an alternating block sequence (block ids, ascending): every adjacent pair of
    what remains. Removing one leaves the sequence alternating, starting with an attention and ending with
    an MLP."""
    return [(a, b) for a, b in zip(remaining, remaining[1:])]


def layer_pairs(removed, num_layers: int) -> list[tuple[int, int]]:
    """(attention source, MLP source) of every layer of the pruned model, for the removed block ids.
    A GradPrunerError when what remains does not alternate attention and MLP from an attention on."""
    removed = set(removed)
    bad = sorted(b for b in removed if not (isinstance(b, int) and 0 <= b < 2 * num_layers))
    if bad:
        raise GradPrunerError(f"Block ids {bad[:8]} are outside 0..{2 * num_layers - 1} (2 blocks per layer).")
    remaining = [b for b in range(2 * num_layers) if b not in removed]
    kinds = [b % 2 for b in remaining]
    if not remaining or kinds != [i % 2 for i in range(len(remaining))] or kinds[-1] != 1:
        raise GradPrunerError("The removed blocks leave an attention without an MLP after it, or two of a kind in a "
                              "row, which no standard layer can hold; remove blocks in adjacent pairs.")
    return [(remaining[i] // 2, remaining[i + 1] // 2) for i in range(0, len(remaining), 2)]


def _zero_attention(*args, hidden_states=None, **kwargs):
    x = hidden_states if hidden_states is not None else args[0]
    return torch.zeros_like(x), None


def _zero_mlp(x, *args, **kwargs):
    return torch.zeros_like(x)


@contextlib.contextmanager
def without_blocks(model, removed):
    """The model computing as if the blocks ``removed`` (ids) were gone: layers with both blocks removed
    leave the forward pass, a lone removed block adds nothing to the residual stream. Weights untouched;
    call with ``use_cache=False``. For measuring what a block removal costs before making it."""
    _, _, layers = find_decoder_layers(model)
    removed = set(removed)
    gone = {i for i in range(len(layers)) if 2 * i in removed and 2 * i + 1 in removed}
    patched = []
    for b in sorted(removed):
        i = b // 2
        if i in gone:
            continue
        module = layers[i].self_attn if b % 2 == 0 else getattr(layers[i], _mlp_name(layers[i]))
        module.forward = _zero_attention if b % 2 == 0 else _zero_mlp
        patched.append(module)
    try:
        with only_layers(model, [i for i in range(len(layers)) if i not in gone]):
            yield model
    finally:
        for module in patched:
            del module.forward


def _mlp_name(layer) -> str:
    for name in ("mlp", "block_sparse_moe", "feed_forward"):
        if hasattr(layer, name):
            return name
    raise GradPrunerError(f"Decoder layer {type(layer).__name__} has no MLP block; use plan.granularity layer.")
