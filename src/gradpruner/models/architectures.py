"""Where a causal LM keeps its decoder layers, and how its config describes them.

Everything here is generic over Hugging Face decoder-only models: the decoder layers are the one
``nn.ModuleList`` whose length is ``config.num_hidden_layers``. ``SUPPORTED`` lists the model types
that the test suite exercises end to end (surgery, cached generation, save and reload); other
decoder-only causal LMs are accepted when their layers can be found and look causal.
"""
from __future__ import annotations

import contextlib
import copy
import inspect

import torch

from gradpruner.errors import GradPrunerError

# model_type -> how it is tested (tests/test_surgery.py, tiny random configs from tests/helpers.py).
_TESTED = "tiny random model: remove layers, generate with/without KV cache, save and reload"
SUPPORTED: dict[str, str] = {
    "llama": _TESTED + " (tied embeddings)",
    "mistral": _TESTED + " (sliding window on every layer)",
    "qwen2": _TESTED + " (use_sliding_window with max_window_layers: full then sliding layers)",
    "qwen3": _TESTED + " (use_sliding_window with max_window_layers: full then sliding layers)",
    "gemma2": _TESTED + " (alternating sliding/full layers, tied embeddings)",
    "gemma3_text": _TESTED + " (explicit mixed layer_types, per-type rotary embeddings, tied embeddings)",
    "phi3": _TESTED + " (fused qkv_proj and gate_up_proj)",
    # Mixture of experts (tests/test_moe.py): fused 3D experts scored and merged per expert (models/experts.py).
    "mixtral": _TESTED + "; experts scored (LoRA on parameters) and merged expert by expert, router kept",
    "qwen2_moe": _TESTED + "; the same, shared expert merged like a dense MLP, dense mlp_only_layers",
    "qwen3_moe": _TESTED + "; the same as mixtral",
}

# Top-level config lists that may happen to have num_hidden_layers entries but are not per layer.
_NOT_PER_LAYER = {"architectures", "eos_token_id", "bos_token_id", "pad_token_id"}
# Ints meaning "the first K layers are special" (Qwen2/3 full-attention layers before sliding ones,
# DeepSeek-style dense layers before MoE ones). Kept layers stay in order, so the special ones
# still come first and their count is the number of kept layers whose old index was below K.
_LEADING_COUNT = ("max_window_layers", "first_k_dense_replace")


def model_type(model) -> str:
    """``config.model_type`` (e.g. ``"llama"``), or the class name of a model without one."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _unsupported(model, why: str) -> GradPrunerError:
    return GradPrunerError(
        f"Model type {model_type(model)!r} is not supported: {why}; "
        f"use a decoder-only causal LM such as one of: {', '.join(sorted(SUPPORTED))}."
    )


def _locate(model) -> tuple[str, torch.nn.Module, str, torch.nn.ModuleList]:
    """(dotted path, parent module, attribute name, ModuleList) of the decoder layers."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0 or not isinstance(model, torch.nn.Module):
        raise _unsupported(model, "no num_hidden_layers in its config, so no decoder layers found")
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name
    ]
    if not candidates:
        raise _unsupported(model, f"no list of {n} decoder layers found")
    # Prefer a path ending in "layers" (model.layers, transformer.layers), then the shallowest one.
    candidates.sort(key=lambda c: (not c[0].endswith("layers"), c[0].count("."), c[0]))
    path, layers = candidates[0]
    if model_type(model) not in SUPPORTED:
        # Untested architecture: accept it only if it is a causal decoder (an encoder such as BERT
        # has the same kind of layer list, but removing its layers is not what this tool does).
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        causal = any(getattr(m, "is_causal", False) is True for m in layers[0].modules())
        if encoder_decoder or not causal:
            raise _unsupported(model, "it is not a decoder-only causal LM (no causal decoder layers found)")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return path, parent, attr, layers


def find_decoder_layers(model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent module, attribute name, ModuleList) holding the decoder layers of ``model``."""
    _, parent, attr, layers = _locate(model)
    return parent, attr, layers


def final_norm(model) -> tuple[str, torch.nn.Module]:
    """(full name, module) of the norm applied after the last decoder layer: the one norm beside the
    decoder layers (``model.norm`` in Llama, Mistral, Qwen, Gemma, Phi-3; ``final_layernorm`` elsewhere)."""
    path, parent, attr, _ = _locate(model)
    parent_path = path.rpartition(".")[0]
    norms = [(name, m) for name, m in parent.named_children() if name != attr and "norm" in type(m).__name__.lower()]
    if len(norms) > 1:
        norms = [(name, m) for name, m in norms if name == "norm"] or norms
    if len(norms) != 1:
        found = ", ".join(name for name, _ in norms) or "none"
        raise _unsupported(model, f"no single final norm beside its decoder layers ({found})")
    name, module = norms[0]
    return (f"{parent_path}.{name}" if parent_path else name), module


@contextlib.contextmanager
def only_layers(model, keep):
    """The model with only the decoder layers ``keep`` (indices, in order) in its forward pass, the
    weights untouched; the full list is put back on exit. For measuring what removing layers costs
    before removing them (selection methods, bench scripts); call with ``use_cache=False``."""
    parent, attr, full = find_decoder_layers(model)
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in keep]))
    try:
        yield model
    finally:
        setattr(parent, attr, full)


def cache_keyword(model) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``cache`` (transformers 5.x) or
    ``past_key_values``; a model's output holds the cache under the same name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoder_layer_prefix(model) -> str:
    """Dotted path of the decoder-layer ModuleList inside ``model``, e.g. ``"model.layers"``."""
    return _locate(model)[0]


def layer_linear_modules(model) -> dict[int, dict[str, torch.nn.Linear]]:
    """Layer index -> {name inside the layer, e.g. ``"self_attn.q_proj"``: nn.Linear}.

    Every ``nn.Linear`` in each decoder layer is listed, MoE experts included when they are
    ``nn.Linear`` modules (fused 3D expert tensors, as transformers 5 stores MoE experts, are not: see
    ``models.experts.expert_params``).
    """
    _, _, layers = find_decoder_layers(model)
    return {
        i: {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for i, layer in enumerate(layers)
    }


def linear_module_names(model) -> list[str]:
    """Full names (as in ``model.named_modules()``) of every nn.Linear in the decoder layers, in order."""
    prefix = decoder_layer_prefix(model)
    return [
        f"{prefix}.{i}.{name}"
        for i, modules in layer_linear_modules(model).items()
        for name in modules
    ]


def validate_keep(keep, num_layers: int) -> list[int]:
    """``keep`` as a list, or a GradPrunerError if it is not sorted unique layer indices in range."""
    problems = []
    try:
        keep = list(keep)
    except TypeError:
        raise GradPrunerError(f"The layers to keep ({keep!r}) must be a list of layer indices.") from None
    if not keep:
        problems.append("The list of layers to keep is empty; keep at least one layer.")
    bad = [k for k in keep if isinstance(k, bool) or not isinstance(k, int)]
    if bad:
        problems.append(f"The layers to keep must be integers, got {bad!r}; give layer indices.")
    else:
        out = [k for k in keep if not 0 <= k < num_layers]
        if out:
            problems.append(
                f"Layer indices {out} are out of range; the model has layers 0..{num_layers - 1}."
            )
        if keep != sorted(set(keep)):
            problems.append(f"The layers to keep ({keep}) must be sorted and unique; list each index once, ascending.")
    if problems:
        raise GradPrunerError(*problems)
    return keep


def _old_layer_types(config, n: int) -> list[str] | None:
    """The attention kind of every old layer, derived the way the config class derives it if unset."""
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", None)
    if isinstance(pattern, int) and pattern > 0:  # Gemma-style: every pattern-th layer is full.
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    mwl = getattr(config, "max_window_layers", None)
    if isinstance(mwl, int) and getattr(config, "use_sliding_window", None) is not None:  # Qwen2-style.
        sliding = bool(config.use_sliding_window) and getattr(config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding and i >= mwl else "full_attention" for i in range(n)]
    return None


def subset_config(config, keep: list[int]):
    """A deep copy of ``config`` describing only the layers in ``keep``, renumbered 0..len(keep)-1."""
    n = config.num_hidden_layers
    keep = validate_keep(keep, n)
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(keep)

    # Every per-layer list (layer_types, mlp_layer_types, no_rope_layers, MoE per-layer settings...)
    # has one entry per old layer: keep the entries of the kept layers, in order.
    for name, value in list(vars(config).items()):
        if name.startswith("_") or name in _NOT_PER_LAYER or name.endswith("_token_id"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(new, name, type(value)(value[i] for i in keep))

    # Layer types are written explicitly even when the config derives them from a position rule
    # (sliding_window_pattern, max_window_layers): the rule applied to new positions would give a
    # kept layer a different attention kind than the one its weights were trained with, and
    # Gemma 2/3 and Qwen2/3 check len(layer_types) == num_hidden_layers when loading.
    old_types = _old_layer_types(config, n)
    if old_types is not None and not isinstance(getattr(type(new), "layer_types", None), property):
        new.layer_types = [old_types[i] for i in keep]

    for name in _LEADING_COUNT:
        old = getattr(config, name, None)
        if isinstance(old, int) and not isinstance(old, bool):
            # Consistent with the explicit layer_types above: Qwen2/3 make layers >= max_window_layers
            # sliding, and the kept layers below the old bound are exactly the first ones kept.
            setattr(new, name, sum(1 for i in keep if i < old))

    # Qwen MoE: a layer is dense if it is in mlp_only_layers or (idx + 1) % decoder_sparse_step != 0.
    # The step rule would flip layers at new positions, so list the kept dense layers explicitly
    # and make the step 1 (every layer not listed is sparse).
    only = getattr(config, "mlp_only_layers", None)
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(only, (list, tuple)) and isinstance(step, int) and step > 0:
        experts = getattr(config, "num_experts", 1) or 0
        dense = {i for i in range(n) if i in only or experts <= 0 or (i + 1) % step}
        new.mlp_only_layers = [j for j, i in enumerate(keep) if i in dense]
        new.decoder_sparse_step = 1

    # A Gemma-style sliding_window_pattern no longer describes the kept layers unless the explicit
    # layer_types still follow it; drop it rather than leave a misleading value in config.json.
    pattern = getattr(config, "sliding_window_pattern", None)
    if isinstance(pattern, int) and pattern > 0 and old_types is not None:
        derived = ["sliding_attention" if (j + 1) % pattern else "full_attention" for j in range(len(keep))]
        if derived != list(new.layer_types):
            for name in ("sliding_window_pattern", "_sliding_window_pattern"):
                if name in vars(new) and not hasattr(type(new), name):  # not a declared field
                    delattr(new, name)
    return new
