"""Mixture-of-experts layers: where fused 3D expert parameters live, how LoRA scores them, and the
names a checkpoint gives them.

Transformers 5 keeps the experts of Mixtral and Qwen2/3-MoE as two 3D ``nn.Parameter``s per layer,
``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]`` (expert e's weights are
``W[e]``, used as ``F.linear(x, W[e])``), while checkpoints (``save_pretrained`` writes them this
way) keep one 2D tensor per expert and projection, e.g. ``mlp.experts.3.gate_proj.weight``.

Scoring: peft's LoRA on parameters (``LoraConfig(target_parameters=...)``, ``ParamWrapper``) gives
every expert e its own factors, stored in one pair ``lora_A [E·r, in]`` (rows e·r..e·r+r-1 are A_e) and
``lora_B [out, r·E]`` (columns e, E+e, ... are B_e) with ΔW[e] = s·B_e A_e. Since ΔW is separable per
expert, grad(A_e) = s·B_eᵀ ∂L/∂W_e and grad(B_e) = s·∂L/∂W_e A_eᵀ, exactly as for a dense LoRA module,
so the paper's IGIA applies to each expert unchanged: ``split_factors`` recovers [E, r, in] and
[E, out, r] per step, ``scoring.igia.step_sq_norms`` gives one squared norm per expert, and the module
score is their sum (every expert's F_W counts in its layer's score).

Merging (``pruning.merging``) works on units: one expert's projection, as the checkpoint stores it
(``UNITS``, ``blocks``). Routers (``mlp.gate``) and the shared-expert gate (``shared_expert_gate``) are
never merged (``is_gate``). See docs/moe.md.
"""
from __future__ import annotations

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models.architectures import (
    decoder_layer_prefix,
    find_decoder_layers,
    model_type,
)

# model_type -> fused parameter (name inside the layer) -> checkpoint names of its row blocks per
# expert ({e}: expert index), in row order: gate_up_proj = cat(gate, up) along its rows.
_QWEN = {"mlp.experts.gate_up_proj": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
         "mlp.experts.down_proj": ("mlp.experts.{e}.down_proj",)}
UNITS: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"mlp.experts.gate_up_proj": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3"),
                "mlp.experts.down_proj": ("block_sparse_moe.experts.{e}.w2",)},
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
}
# Checkpoint-name renames of the rest of an MoE block (transformers renames them on load).
RENAMES = {"mixtral": (".mlp.", ".block_sparse_moe.")}
# Linear gates: scored like any linear module, never merged. Transformers 5 routers (``mlp.gate``)
# are not nn.Linear at all; "gate" also covers MoE code that keeps its router as an nn.Linear.
GATES = ("gate", "shared_expert_gate")


def is_gate(rel: str) -> bool:
    """True for a linear module that gates experts (kept as the target's own when merging)."""
    return rel.split(".")[-1] in GATES


def expert_params(model) -> dict[int, dict[str, torch.nn.Parameter]]:
    """Layer index -> {name inside the layer: fused 3D expert parameter}; empty dicts for dense models.

    Raises a GradPrunerError for a model with 3D parameters whose layout gradpruner does not know."""
    _, _, layers = find_decoder_layers(model)
    found = {i: {n: p for n, p in layer.named_parameters() if p.ndim == 3} for i, layer in enumerate(layers)}
    fused = sorted({n for per in found.values() for n in per})
    known = UNITS.get(model_type(model), {})
    unknown = [n for n in fused if n not in known]
    if unknown:
        raise GradPrunerError(
            f"Model type {model_type(model)!r} keeps mixture-of-experts weights in fused 3D tensors "
            f"({unknown[0]}) whose layout gradpruner does not know (which rows are which expert projection, "
            f"what its checkpoint calls them); use one of {', '.join(sorted(UNITS))} or add the layout to "
            "gradpruner.models.experts.UNITS.")
    return found


def expert_parameter_names(model) -> list[str]:
    """Full names of every fused expert parameter in the decoder layers (LoRA targets), in order."""
    per_layer = expert_params(model)
    if not any(per_layer.values()):
        return []
    prefix = decoder_layer_prefix(model)
    return [f"{prefix}.{i}.{rel}" for i, params in per_layer.items() for rel in params]


def check_lora(params: list[str], adapter: str, dropout: float, method: str = "igia") -> None:
    """peft's LoRA on parameters supports neither DoRA nor dropout; say so before any work."""
    if params and method == "igia_saliency":  # it needs each module's weight as an nn.Linear
        raise GradPrunerError(f"--method igia_saliency cannot score the fused mixture-of-experts weights of this "
                              f"model ({params[0]}); use igia or igia_guarded.")
    if params and (adapter != "lora" or dropout):
        raise GradPrunerError(f"This model has mixture-of-experts weights ({params[0]}) that are scored with "
                              "LoRA on parameters, which supports neither DoRA nor dropout; use --adapter lora "
                              "and --lora-dropout 0.")


# --- capture: per-expert factors out of peft's ParamWrapper ----------------------------------

def lora_base_name(name: str, module) -> str:
    """The base-model name a LoRA module's factors are stored under: the module's own name, or for
    LoRA on a parameter the parameter's name (nested wrappers add ``.base_layer`` segments)."""
    name = name.removeprefix("base_model.model.")
    param = getattr(module, "parameter_name", None)
    if param is None:
        return name
    return ".".join(p for p in name.split(".") if p != "base_layer") + f".{param}"


def lora_experts(module) -> int | None:
    """Number of experts of a LoRA-on-parameter module over a 3D [E, out, in] parameter, else None."""
    experts = getattr(module, "num_experts", None)
    if getattr(module, "parameter_name", None) is None or not experts or getattr(module, "_param_ndim", 3) != 3:
        return None
    if not getattr(module, "_did_swap_in_out_features", False):  # [E, in, out] (gpt-oss): ΔW[e] = (B_e A_e)ᵀ
        raise GradPrunerError(f"Expert parameter {module.parameter_name} is stored as [experts, in, out], which "
                              "gradpruner does not score; use a model whose experts are [experts, out, in].")
    return int(experts)


def split_factors(grad_a, grad_b, experts: int):
    """peft's stacked grad(lora_A) [E·r, in] and grad(lora_B) [out, r·E] -> per expert [E, r, in] and
    [E, out, r] (the layout of ``ParamWrapper.get_delta_factors``); a None gradient stays None."""
    ga = None if grad_a is None else grad_a.reshape(experts, -1, grad_a.shape[-1])
    gb = None if grad_b is None else grad_b.reshape(grad_b.shape[0], -1, experts).permute(2, 0, 1)
    return ga, gb


def split_shapes(shape_a, shape_b, experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-expert factor shapes ``split_factors`` returns, from peft's stacked shapes."""
    return (experts, shape_a[0] // experts, shape_a[1]), (experts, shape_b[0], shape_b[1] // experts)


# --- units (one expert's projection) and checkpoint names --------------------------------------

def blocks(model_type: str, rel: str, param_shape) -> list[tuple[str, int, slice]]:
    """(checkpoint name inside the layer, expert, rows of W[e]) for every unit of a fused parameter."""
    names = UNITS[model_type][rel]
    n_rows = param_shape[1] // len(names)
    return [(pattern.format(e=e), e, slice(k * n_rows, (k + 1) * n_rows))
            for e in range(param_shape[0]) for k, pattern in enumerate(names)]


def checkpoint_names(model) -> set[str]:
    """Every tensor name a checkpoint of ``model`` may hold: its own parameter names (fused experts)
    and the per-expert names ``save_pretrained`` writes (with the model type's renames)."""
    names = set(model.state_dict())
    mt = model_type(model)
    if mt not in UNITS:
        return names
    prefix = decoder_layer_prefix(model)
    legacy = set()
    for i, params in expert_params(model).items():
        for rel, p in params.items():
            legacy |= {f"{prefix}.{i}.{unit}.weight" for unit, _, _ in blocks(mt, rel, p.shape)}
    fused = {f"{prefix}.{i}.{rel}" for i, params in expert_params(model).items() for rel in params}
    old, new = RENAMES.get(mt, ("", ""))
    legacy |= {n.replace(old, new) if old else n for n in names - fused}
    return names | legacy


def checkpoint_units(model, files) -> dict[int, dict[str, tuple]]:
    """Layer -> {tensor name inside the layer: (fused rel, expert, rows)} for the expert tensors of a
    checkpoint with names ``files``: per-expert 2D tensors, or the fused 3D ones (expert None)."""
    per_layer, mt, prefix = expert_params(model), model_type(model), decoder_layer_prefix(model)
    out: dict[int, dict[str, tuple]] = {}
    for i, params in per_layer.items():
        out[i] = {}
        for rel, p in params.items():
            if f"{prefix}.{i}.{rel}" in files:
                out[i][rel] = (rel, None, None)
            else:
                out[i].update({f"{unit}.weight": (rel, e, rows) for unit, e, rows in blocks(mt, rel, p.shape)})
    return out
