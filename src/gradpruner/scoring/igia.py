"""IGIA scoring math (paper Eq. 2–4), as small pure functions over gradient factors.

For a LoRA-wrapped linear module W (out×in) with factors B (out×r) and A (r×in), step i gives the
simulated gradient G_i = grad(B)_i @ grad(A)_i (Eq. 2; the paper prints grad(B)·grad(B), a typo).
The IGIA-Matrix is F_W = (1/t) Σ_i G_i ⊙ G_i (Eq. 3) and a layer's score is the sum of all entries of
F_W over its linear modules (Eq. 4).

Σ entries of G_i ⊙ G_i = ‖G_B G_A‖²_F = tr((G_Bᵀ G_B)(G_A G_Aᵀ)): an r×r product, so scores never
materialise an out×in matrix. A full F_W is built only for a module about to be merged
(``module_igia``, from the factors stored in igia.safetensors).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gradpruner.errors import GradPrunerError, lookup


def step_sq_norms(grad_b: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """‖grad_B[i] @ grad_A[i]‖²_F for every step i via the r×r trace identity.

    grad_b: [T, out, r] (or [out, r]); grad_a: [T, r, in] (or [r, in]). Returns [T] (or a scalar), float64.
    Leading batch dimensions pass through: per-expert factors [T, E, out, r], [T, E, r, in] give [T, E].
    """
    gb = grad_b.to(torch.float64)
    ga = grad_a.to(torch.float64)
    bb = gb.transpose(-1, -2) @ gb  # [T, r, r] = G_Bᵀ G_B
    aa = ga @ ga.transpose(-1, -2)  # [T, r, r] = G_A G_Aᵀ
    # tr(X Y) = Σ X ⊙ Yᵀ, and both are symmetric.
    return (bb * aa).sum(dim=(-1, -2))


def igia_matrix(grad_b: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """F_W = (1/T) Σ_i (grad_B[i] @ grad_A[i])², the full out×in IGIA-Matrix (float32).

    Built one step at a time so memory stays at two out×in buffers whatever T is. Leading batch
    dimensions pass through: per-expert factors [T, E, out, r] and [T, E, r, in] give [E, out, in].
    """
    steps = grad_b.shape[0]
    acc = torch.zeros(*grad_b.shape[1:-1], grad_a.shape[-1], dtype=torch.float32)
    for i in range(steps):
        g = grad_b[i].to(torch.float32) @ grad_a[i].to(torch.float32)
        acc.addcmul_(g, g)
    return acc.div_(steps)


def module_igia(f, keys: set[str], name: str, shape, path, expert: int | None = None,
                rows: slice | None = None) -> torch.Tensor:
    """F_W of one module from its factors in an open igia.safetensors ``f`` (whose names are ``keys``),
    checking they belong to it: ``shape`` is the module's weight shape (out, in).

    For one expert of a fused mixture-of-experts parameter ``name`` (factors stored per expert,
    [T, E, r, in] and [T, E, out, r]), ``expert`` picks the expert and ``rows`` the rows of its
    projection (one unit of ``models.experts.blocks``); only those slices are read. ``path`` names
    the file in error messages."""
    if f"{name}.grad_A" not in keys or f"{name}.grad_B" not in keys:
        raise GradPrunerError(f"IGIA file {path} has no factors for {name}; score this model again "
                              "(the file may come from another model or gradpruner version).")
    if expert is None:
        grad_a, grad_b = f.get_tensor(f"{name}.grad_A"), f.get_tensor(f"{name}.grad_B")
    else:
        grad_a = f.get_slice(f"{name}.grad_A")[:, expert]
        grad_b = f.get_slice(f"{name}.grad_B")[:, expert, rows.start:rows.stop]
    if (grad_b.shape[1], grad_a.shape[-1]) != tuple(shape):
        which = name if expert is None else f"{name} (expert {expert})"
        raise GradPrunerError(f"IGIA factors for {which} in {path} have shapes {tuple(grad_b.shape)} and "
                              f"{tuple(grad_a.shape)}, not those of this model's {shape[0]}×{shape[1]} "
                              "module; score this model again.")
    return igia_matrix(grad_b, grad_a)


# --- module score rules: per-step squared norms [T] -> one float --------------------------------

def score_igia(sq: torch.Tensor) -> float:
    """The paper's Eq. 3–4: mean over steps of ‖G_i‖²_F (= Σ entries of F_W)."""
    return float(sq.mean())


def score_igia_norm(sq: torch.Tensor) -> float:
    """The authors' release: the unsquared Frobenius norm ‖G_i‖_F summed over steps."""
    return float(sq.clamp_min(0).sqrt().sum())


IGIA_SCORES: dict[str, Callable[[torch.Tensor], float]] = {
    "igia": score_igia,
    "igia_norm": score_igia_norm,
}


def module_scores(step_norms: dict[str, torch.Tensor], rule: str = "igia") -> dict[str, float]:
    """Apply a score rule to each module's per-step squared norms."""
    fn = lookup(IGIA_SCORES, rule, "IGIA method")
    return {name: fn(sq) for name, sq in step_norms.items()}


def layer_scores(mod_scores: dict[str, float], module_layer: dict[str, int], num_layers: int) -> list[float]:
    """score_j = Σ over layer j's linear modules of the module score (Eq. 4)."""
    out = [0.0] * num_layers
    for name, value in mod_scores.items():
        out[module_layer[name]] += value
    return out


def informative_steps(step_norms: dict[str, torch.Tensor]) -> int:
    """Steps whose simulated gradient is non-zero somewhere; step 1 is zero because B starts at 0."""
    total = sum(sq for sq in step_norms.values())
    return int((total > 0).sum()) if isinstance(total, torch.Tensor) else 0
