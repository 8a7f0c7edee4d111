"""Hidden-size ("kernel") pruning — the paper's Appendix D ablation, beside layer pruning.

Instead of removing decoder layers, remove the least important dimensions of the residual stream
(``hidden_size``) in every layer, at the same parameter budget. The importance of dimension c is
its share of the IGIA-Matrix: Σ over steps and modules of G_i² summed over column c for modules
that read the residual stream (q, k, v, gate, up: ``in_features = hidden_size``) and over row c for
modules that write it (o, down). Every weight of a Llama-family model has exactly one hidden-size
axis, so keeping d' of d dimensions keeps d'/d of the parameters.

Pruned dimensions are dropped, not merged: the paper merges them "with the unpruned ones" without
saying how, and a dimension of the residual stream has no same-shaped partner to merge into the way
a layer does. RMSNorm then averages over d' dimensions, so its weights are scaled by sqrt(d/d'):
exact when the dropped dimensions carry nothing, a first-order correction otherwise. Supported: llama, mistral, qwen2, qwen3 (no embedding scaling and
no per-dimension norms other than RMSNorm weights).
"""
from __future__ import annotations

import math

import torch

from gradpruner.errors import GradPrunerError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
WRITERS = ("o_proj", "down_proj")


def module_role(name: str) -> str:
    """``write`` for modules whose output is the residual stream, else ``read``."""
    return "write" if name.split(".")[-1] in WRITERS else "read"


def dim_scores(factors_path, hidden_size: int) -> list[float]:
    """IGIA importance of each residual-stream dimension from the stored LoRA gradient factors."""
    from safetensors import safe_open

    total = torch.zeros(hidden_size, dtype=torch.float64)
    with safe_open(str(factors_path), "pt") as f:
        names = sorted({k[: -len(".grad_A")] for k in f.keys() if k.endswith(".grad_A")})
        for name in names:
            ga, gb = f.get_tensor(f"{name}.grad_A").double(), f.get_tensor(f"{name}.grad_B").double()
            role = module_role(name)
            if (role == "read" and ga.shape[2] != hidden_size) or (role == "write" and gb.shape[1] != hidden_size):
                continue  # e.g. a module that reads the attention output, not the residual stream
            for i in range(ga.shape[0]):
                g2 = (gb[i] @ ga[i]).pow(2)
                total += g2.sum(dim=0) if role == "read" else g2.sum(dim=1)
    if not bool(torch.isfinite(total).all()):
        raise GradPrunerError(f"IGIA file {factors_path} gives non-finite dimension scores; rerun `gradpruner score`.")
    return total.tolist()


def width_plan(scores: list[float], keep_fraction: float, multiple: int = 1) -> dict:
    """Keep the highest-scoring dimensions (ties: lower index first): keep_fraction · d of them,
    rounded to the nearest multiple of ``multiple`` (transformers requires hidden_size to be a
    multiple of the number of attention heads)."""
    d = len(scores)
    if not 0 < keep_fraction <= 1:
        raise GradPrunerError(f"The fraction of hidden dimensions kept must be in (0, 1], not {keep_fraction}.")
    k = min(d, max(multiple, multiple * round(keep_fraction * d / multiple)))
    order = sorted(range(d), key=lambda c: (-scores[c], c))
    keep = sorted(order[:k])
    return {"hidden_size": d, "keep_dims": keep, "drop_dims": sorted(order[k:])}


def validate_width(hidden: dict, config) -> list[int]:
    """The plan's ``hidden`` section against the model; returns the kept dimensions."""
    problems = []
    if config.model_type not in SUPPORTED:
        problems.append(f"Hidden-size pruning supports {', '.join(SUPPORTED)}, not {config.model_type}; "
                        "use layer pruning (plan.granularity: layer) for this model.")
    d = config.hidden_size
    keep = hidden.get("keep_dims") if isinstance(hidden, dict) else None
    if hidden.get("hidden_size") != d if isinstance(hidden, dict) else True:
        problems.append(f"The plan's hidden section was made for hidden_size {hidden.get('hidden_size') if isinstance(hidden, dict) else None}, "
                        f"this model has {d}; make a new plan for this model.")
    if not isinstance(keep, list) or not keep or not all(isinstance(c, int) and 0 <= c < d for c in keep) \
            or len(set(keep)) != len(keep):
        problems.append(f"The plan's hidden.keep_dims must be distinct dimension indices in 0..{d - 1}.")
    elif len(keep) % config.num_attention_heads:
        problems.append(f"The plan keeps {len(keep)} hidden dimensions, not a multiple of the model's "
                        f"{config.num_attention_heads} attention heads, which transformers requires; make a new plan.")
    if problems:
        raise GradPrunerError(*problems)
    return sorted(keep)


@torch.no_grad()
def prune_width(model, keep: list[int]) -> None:
    """Keep only residual-stream dimensions ``keep`` everywhere, in place, and fix the config."""
    cfg = model.config
    d = cfg.hidden_size
    idx = torch.tensor(keep, dtype=torch.long)
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads

    def take(t: torch.Tensor, dim: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(t.index_select(dim, idx.to(t.device)).contiguous(), requires_grad=t.requires_grad)

    emb = model.get_input_embeddings()
    emb.weight = take(emb.weight, 1)
    emb.embedding_dim = len(keep)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        head.weight = take(head.weight, 1)
    if head is not None:
        head.in_features = len(keep)
    for name, mod in model.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            if leaf in WRITERS and mod.out_features == d:
                mod.weight = take(mod.weight, 0)
                if mod.bias is not None:
                    mod.bias = take(mod.bias, 0)
                mod.out_features = len(keep)
            elif leaf not in WRITERS and mod.in_features == d:
                mod.weight = take(mod.weight, 1)
                mod.in_features = len(keep)
        elif "norm" in leaf and getattr(mod, "weight", None) is not None and mod.weight.shape == (d,) \
                and leaf not in ("q_norm", "k_norm"):
            # RMSNorm divides by sqrt(Σx²/d'): scale by sqrt(d/d') so a stream whose dropped
            # dimensions carry nothing is normalised exactly as before.
            mod.weight = take(mod.weight * math.sqrt(d / len(keep)), 0)
    if model.config.tie_word_embeddings and head is not None:
        head.weight = emb.weight
    cfg.hidden_size = len(keep)
    cfg.head_dim = head_dim  # attention keeps its width; only the residual stream narrows
