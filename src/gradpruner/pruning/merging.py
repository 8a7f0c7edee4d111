"""Layer merging (the GradPruner paper, Section 3.2): fold a removed layer's linear module into the same
module of a kept one.

Two steps, per linear module:

1. Trim each source, as ``TRIM[rule]`` says: ``"igia"`` keeps the fraction ``density`` (the paper's
   p = 20%) of W_src's entries with the largest IGIA values F_src (``sparsify``); ``"magnitude"`` keeps
   the ``density`` largest |W_src| (``magnitude_trim``, TIES); ``None`` keeps all of W_src and ignores
   ``density``. The trimmed source is Ŵ_src.
2. A merge rule combines W_dst with the trimmed sources:

   * ``sign_sum`` (paper Eq. 5), ``sign_mean`` (Eq. 6), ``fisher`` (App. B.2): only entries where
     Ŵ_src is non-zero ("selected") and sign(Ŵ_src) == sign(W_dst) ("sign-matched") take part;
     every other entry of W_dst is left as it is. Each source is compared with W_dst's *own* sign,
     never with a running sum; an entry where W_dst == 0 has sign 0 and is never merged.
   * ``weighted_average`` (Fig. 7 baseline): ``sign_mean`` without the sign check.
   * ``ties`` (TIES-merging, Yadav et al. 2023): elected sign, then the disjoint mean.
   * ``none``: drop only, W_dst unchanged. ``laco`` (LaCo's RDSC): W_dst + Σ (W_src − W_dst).

Rules are small pure functions ``rule(w_dst, sources, f_dst=None) -> Tensor`` over
``sources = [(Ŵ_src, F_src or None), ...]`` in a plain dict, looked up by name::

    new_w, stats = merge_module(w_dst, [(w_src, f_src)], rule="sign_sum", density=0.2)
    new_w, stats = merge_module(w_dst, [(w_src, None)], rule="ties", density=0.2)

    # or in a config:   merge_rule: sign_mean

``needs_igia(rule)`` says whether a rule needs the IGIA factors of ``gradpruner score``.
No rule and no ``merge_module`` call modifies its inputs. See docs/merge_rules.md.

Applying a plan: ``merge_layers`` merges a loaded model in place, module by module, fused
mixture-of-experts parameters expert by expert (``merge_experts``); the out-of-core path
(``pruning.streamed``) calls ``merge_module`` and ``StreamedExperts`` on checkpoint tensors.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from gradpruner.errors import GradPrunerError, lookup
from gradpruner.models.architectures import (
    decoder_layer_prefix,
    layer_linear_modules,
    model_type,
)
from gradpruner.models.experts import blocks, checkpoint_units, expert_params, is_gate
from gradpruner.scoring.igia import module_igia

MergeSource = tuple[Tensor, "Tensor | None"]  # (Ŵ_src already trimmed, F_src or None)


def check_density(density) -> None:
    if (not isinstance(density, numbers.Real) or isinstance(density, bool)
            or not 0 < density <= 1):
        raise GradPrunerError(f"--density must be in (0, 1] (got {density!r}); the paper keeps 0.2.")


def _check_finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise GradPrunerError(f"{what} holds NaN or infinite values; rerun gradient scoring.")


def sparsify(w_src: Tensor, f_src: Tensor, density: float, *,
             what: str = "The IGIA matrix of a merged module") -> Tensor:
    """Ŵ = W ⊙ 1[F ranks in the top k], k = max(1, round(density · numel)).

    ``f_src`` is any non-negative score of W's shape: the IGIA matrix F (the paper's "magnitude of
    the IGIA-Matrix", a mean of squares, so F ≥ 0) or |W| (``magnitude_trim``). Exactly k entries
    are kept, even with ties in the score: entries above the k-th largest value are kept, then
    entries equal to it in flattened (row-major) order, lowest index first, until there are k.
    ``what`` names the score in error messages.
    """
    check_density(density)
    if w_src.shape != f_src.shape:
        raise GradPrunerError(f"Weight shape {tuple(w_src.shape)} and IGIA shape "
                              f"{tuple(f_src.shape)} differ; both must come from the same module.")
    n = w_src.numel()
    if n == 0:
        return w_src.clone()
    _check_finite(f_src, what)
    k = min(n, max(1, round(density * n)))
    flat = f_src.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue wants a full-precision float; bf16/fp16 -> fp32 is exact
    if k == n:
        mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    else:
        thr = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
        mask = flat > thr
        need = k - int(mask.sum())
        ties = torch.nonzero(flat == thr).squeeze(1)[:need]
        mask[ties] = True
    return torch.where(mask.view(w_src.shape), w_src, torch.zeros_like(w_src))


def magnitude_trim(w_src: Tensor, density: float) -> Tensor:
    """TIES' trim step: keep the ``density`` fraction of W's entries largest in |W| (same exact-k
    rule as ``sparsify``), zero the rest."""
    return sparsify(w_src, w_src.abs(), density, what="A merged layer's weight")


def _matched(w_hat: Tensor, w_dst: Tensor) -> Tensor:
    """Selected (non-zero in Ŵ_src) and sign-matched with W_dst's own sign."""
    return (w_hat != 0) & (torch.sign(w_hat) == torch.sign(w_dst))


def sign_sum(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None,
             lam: float = 1.0) -> Tensor:
    """Paper Eq. 5 and the authors' code (λ = 1): W = W_dst + λ · Σ_src m_src ⊙ Ŵ_src,
    m_src = 1[Ŵ_src ≠ 0 and sign(Ŵ_src) = sign(W_dst)]. ``f_dst`` is unused."""
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam):
        raise GradPrunerError(f"The merge weight lambda must be a finite number (got {lam!r}).")
    out = w_dst.clone()
    for w_hat, _ in sources:
        out.add_(torch.where(_matched(w_hat, w_dst), w_hat, torch.zeros_like(w_hat)), alpha=lam)
    return out


def sign_mean(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None) -> Tensor:
    """Appendix B.2 Eq. 6 ((0.5, 0.5) weights), for any number of sources:
    W = (W_dst + Σ_src m_src ⊙ Ŵ_src) / (1 + Σ_src m_src), m_src as in ``sign_sum``.
    Where no source matches this is W_dst exactly. ``f_dst`` is unused."""
    num = w_dst.clone()
    count = torch.ones_like(w_dst)
    for w_hat, _ in sources:
        m = _matched(w_hat, w_dst)
        num.add_(torch.where(m, w_hat, torch.zeros_like(w_hat)))
        count.add_(m.to(count.dtype))
    return num / count


def fisher(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None) -> Tensor:
    """Appendix B.2 Fisher merging with Eq. 6's adaptive weights (λ_dst, λ_src) = (0.5, 0.5):
    where at least one source matches,
        W = (0.5 F_dst W_dst + Σ_src m_src 0.5 F_src Ŵ_src) / (0.5 F_dst + Σ_src m_src 0.5 F_src),
    falling back to ``sign_mean`` where that denominator is 0; elsewhere W = W_dst (λ = (1, 0)).
    F_dst is the kept module's own IGIA matrix, standing in for its Fisher diagonal."""
    if f_dst is None:
        raise GradPrunerError("The 'fisher' merge rule needs the kept layer's IGIA matrix (f_dst); "
                              "compute it for the merge targets or choose 'sign_sum' or 'sign_mean'.")
    if f_dst.shape != w_dst.shape:
        raise GradPrunerError(f"IGIA shape {tuple(f_dst.shape)} differs from weight shape "
                              f"{tuple(w_dst.shape)} of the kept module.")
    num = 0.5 * f_dst * w_dst
    den = 0.5 * f_dst
    any_m = torch.zeros_like(w_dst, dtype=torch.bool)
    for w_hat, f_src in sources:
        m = _matched(w_hat, w_dst)
        any_m |= m
        num = num + torch.where(m, 0.5 * f_src * w_hat, torch.zeros_like(w_hat))
        den = den + torch.where(m, 0.5 * f_src, torch.zeros_like(f_src))
    zero = den == 0
    weighted = num / torch.where(zero, torch.ones_like(den), den)
    merged = torch.where(zero, sign_mean(w_dst, sources), weighted)
    return torch.where(any_m, merged, w_dst)


def weighted_average(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None) -> Tensor:
    """Fig. 7's baseline, ``sign_mean`` without the sign check: W = (W_dst + Σ_src m_src ⊙ Ŵ_src) /
    (1 + Σ_src m_src), m_src = 1[Ŵ_src ≠ 0]; W_dst where no source is selected. ``f_dst`` is unused."""
    num = w_dst.clone()
    count = torch.ones_like(w_dst)
    for w_hat, _ in sources:
        m = w_hat != 0
        num.add_(torch.where(m, w_hat, torch.zeros_like(w_hat)))
        count.add_(m.to(count.dtype))
    return num / count


def _elected_sign(w_dst: Tensor, sources: list[MergeSource]) -> Tensor:
    return torch.sign(sum((w_hat for w_hat, _ in sources), w_dst))


def ties(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None) -> Tensor:
    """TIES-merging for layers, over magnitude-trimmed sources (W_dst is not trimmed): elected sign
    s = sign(W_dst + Σ_src Ŵ_src); W = mean of the values among {W_dst, Ŵ_src...} that are non-zero
    with sign s (disjoint mean); W_dst where s == 0. ``f_dst`` is unused."""
    s = _elected_sign(w_dst, sources)
    num = torch.zeros_like(w_dst)
    count = torch.zeros_like(w_dst)
    for v in [w_dst] + [w_hat for w_hat, _ in sources]:
        m = (v != 0) & (torch.sign(v) == s)
        num.add_(torch.where(m, v, torch.zeros_like(v)))
        count.add_(m.to(count.dtype))
    # s != 0 implies some value has sign s, so count ≥ 1 there
    return torch.where(s == 0, w_dst, num / count.clamp(min=1))


def none(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None) -> Tensor:
    """Drop only: a copy of W_dst; the sources are ignored."""
    return w_dst.clone()


def laco(w_dst: Tensor, sources: list[MergeSource], f_dst: Tensor | None = None) -> Tensor:
    """LaCo's RDSC layer collapse over the full (untrimmed) sources: W = W_dst + Σ_src (W_src − W_dst).
    ``f_dst`` is unused."""
    out = w_dst.clone()
    for w_src, _ in sources:
        out.add_(w_src - w_dst)
    return out


MERGE_RULES = {"sign_sum": sign_sum, "sign_mean": sign_mean, "fisher": fisher,
               "weighted_average": weighted_average, "ties": ties, "none": none, "laco": laco}
# How merge_module trims each rule's sources: by IGIA F, by |W|, or not at all (density unused).
TRIM = {"sign_sum": "igia", "sign_mean": "igia", "fisher": "igia", "weighted_average": "igia",
        "ties": "magnitude", "none": None, "laco": None}


def needs_igia(rule: str) -> bool:
    """True when ``rule`` trims by IGIA or weighs by the kept layer's IGIA matrix (fisher)."""
    lookup(MERGE_RULES, rule, "merge rule")
    return TRIM[rule] == "igia" or rule == "fisher"


def _used(rule: str, w_hat: Tensor, w_dst: Tensor, elected: Tensor | None) -> int:
    """How many entries of one trimmed source ``rule`` actually merges into W_dst."""
    if rule == "none":
        return 0
    if rule in ("weighted_average", "laco"):
        return int(torch.count_nonzero(w_hat))
    if rule == "ties":
        return int(((w_hat != 0) & (torch.sign(w_hat) == elected)).sum())
    return int(_matched(w_hat, w_dst).sum())


def merge_module(w_dst: Tensor, srcs: list[tuple[Tensor, Tensor | None]], rule: str, density: float,
                 f_dst: Tensor | None = None) -> tuple[Tensor, dict]:
    """Merge raw sources ``srcs = [(W_src, F_src or None), ...]`` into ``w_dst`` with ``MERGE_RULES[rule]``.

    Each W_src is trimmed first as ``TRIM[rule]`` says (F_src may be None unless that is "igia";
    ``density`` is unused and unchecked when it is None). The arithmetic runs in float32 (float64 if
    w_dst is float64) and the result is cast back to w_dst's dtype. Returns ``(new_w, stats)``:
    stats["entries"] = numel; stats["kept_per_source"] = non-zero entries of each Ŵ_src;
    stats["merged_per_source"] = of those, the ones the rule merges (sign-matched with W_dst for
    sign_sum/sign_mean/fisher, with the elected sign for ties, all for weighted_average/laco, none
    for none); stats["changed_fraction"] = fraction of entries of the result that differ from w_dst.
    """
    fn = lookup(MERGE_RULES, rule, "merge rule")
    trim = TRIM[rule]
    if trim is not None:
        check_density(density)
    shape = tuple(w_dst.shape)
    for i, (w_src, f_src) in enumerate(srcs):
        if f_src is None and trim == "igia":
            raise GradPrunerError(f"Merge source {i} has no IGIA matrix, but the merge rule {rule!r} "
                                  "keeps entries by IGIA; pass F_src from `gradpruner score`.")
        for what, t in (("weight", w_src), ("IGIA matrix", f_src)):
            if t is not None and tuple(t.shape) != shape:
                raise GradPrunerError(f"Merge source {i}'s {what} has shape {tuple(t.shape)}, but the "
                                      f"kept module's weight has shape {shape}; merged layers must "
                                      "have the same architecture as their target.")
    if f_dst is not None and tuple(f_dst.shape) != shape:
        raise GradPrunerError(f"The kept module's IGIA matrix has shape {tuple(f_dst.shape)}, "
                              f"but its weight has shape {shape}.")
    cdt = torch.float64 if w_dst.dtype == torch.float64 else torch.float32
    wd = w_dst.detach().to(cdt)
    sources = []
    for w, f in srcs:
        # F comes from the factors file (host memory); the merge runs where the kept weight lives
        w, f = w.detach().to(wd.device, cdt), (None if f is None else f.detach().to(wd.device, cdt))
        w_hat = (sparsify(w, f, density) if trim == "igia" else
                 magnitude_trim(w, density) if trim == "magnitude" else w)
        sources.append((w_hat, f))
    fd = None
    if f_dst is not None:
        fd = f_dst.detach().to(wd.device, cdt)
        _check_finite(fd, "The kept module's IGIA matrix")
    new = fn(wd, sources, f_dst=fd).to(w_dst.dtype)
    n = w_dst.numel()
    elected = _elected_sign(wd, sources) if rule == "ties" else None
    stats = {
        "entries": n,
        "kept_per_source": [int(torch.count_nonzero(w_hat)) for w_hat, _ in sources],
        "merged_per_source": [_used(rule, w_hat, wd, elected) for w_hat, _ in sources],
        "changed_fraction": float((new != w_dst.detach()).sum()) / n if n else 0.0,
    }
    return new, stats


# --- applying a plan's merges to a model --------------------------------------------------------

def merge_layers(model, merge: dict, factors_path, density: float, rule: str = "sign_sum") -> dict:
    """Fold every merged layer into its target in place, one module at a time (the paper's Section 3.2).

    ``merge`` maps a removed layer index (str or int) to the kept layer it merges into.
    ``factors_path`` is the igia.safetensors of ``gradpruner score``; it may be None (and is never
    opened) when ``not needs_igia(rule)``. Full F_W matrices are built only for the module being
    merged and freed before the next one, so peak memory is the model plus a few module-sized
    buffers. Fused MoE experts merge expert e into expert e, one projection at a time, and gates
    (routers) stay the target's own (``merge_experts``). Returns per-module merge statistics.
    """
    from contextlib import nullcontext

    from safetensors import safe_open
    from tqdm.auto import tqdm

    igia = needs_igia(rule)
    if TRIM[rule] is not None:
        check_density(density)
    if igia and factors_path is None:
        free = ", ".join(r for r in MERGE_RULES if not needs_igia(r))
        raise GradPrunerError(f"The merge rule {rule!r} needs the IGIA factors of `gradpruner score "
                              f"--method igia`; pass that igia.safetensors, or choose a rule that "
                              f"does not need them ({free}).")
    layers, prefix = layer_linear_modules(model), decoder_layer_prefix(model)
    expert_params(model)  # refuses fused experts of an unknown layout before anything changes
    by_target: dict[int, list[int]] = {}
    for src, dst in merge.items():
        by_target.setdefault(int(dst), []).append(int(src))
    jobs = [(t, rel) for t in sorted(by_target) for rel in layers[t] if not is_gate(rel)]  # routers stay
    stats = {}
    with (safe_open(str(factors_path), "pt") if igia else nullcontext()) as f, torch.no_grad():
        keys = set(f.keys()) if igia else set()

        def igia_of(i: int, rel: str, wanted: bool):
            name = f"{prefix}.{i}.{rel}"
            mod = layers[i][rel]
            return module_igia(f, keys, name, (mod.out_features, mod.in_features), factors_path) if wanted else None

        for t, rel in tqdm(jobs, desc="merging", unit="module"):
            dst = layers[t][rel]
            srcs = [s for s in sorted(by_target[t]) if rel in layers[s]]
            if not srcs:  # e.g. a dense MoE layer merged into a sparse one: nothing to merge (as streamed.py)
                continue
            pairs = [(layers[s][rel].weight, igia_of(s, rel, TRIM[rule] == "igia")) for s in srcs]
            f_dst = igia_of(t, rel, rule == "fisher")
            new, st = merge_module(dst.weight, pairs, rule, density, f_dst)
            dst.weight.copy_(new)
            stats[f"{prefix}.{t}.{rel}"] = {"sources": [f"{prefix}.{s}.{rel}" for s in srcs], **st}
            del pairs, new, f_dst
        stats.update(merge_experts(model, by_target, f, keys, factors_path, rule, density))  # expert e -> e
    return stats


# --- fused mixture-of-experts parameters: the unit is one expert's projection ----------------------
# Expert e of a merged layer goes into expert e of its target, gate and up separately (each trimmed to
# its own top-``density`` entries by its own rows of F), through ``merge_module``; the units and the
# checkpoint names are ``models.experts``'. See docs/moe.md.

def merge_expert_unit(w_dst, srcs, rule: str, density: float, igia, dst_loc=None):
    """Merge one expert unit: ``srcs = [(W_src, locate_src)]``; ``igia(locate)`` gives F or None."""
    pairs = [(w, igia(loc) if TRIM[rule] == "igia" else None) for w, loc in srcs]
    return merge_module(w_dst, pairs, rule, density, igia(dst_loc) if rule == "fisher" else None)


def merge_fused(w_dst, srcs, rule: str, density: float, igia, dst_loc, model_type: str, out=None):
    """A whole fused [E, out, in] tensor, unit by unit (both prune paths).
    ``srcs = [(W_src, (layer, rel))]``; ``dst_loc = (layer, rel)``; returns (new tensor, per-unit stats).
    ``out``: the tensor to write into (``w_dst`` itself merges in place: each unit reads only its own
    rows before writing them); default a copy of ``w_dst``."""
    new, stats = (w_dst.clone() if out is None else out), {}
    rel = dst_loc[1]
    for unit, e, rows in blocks(model_type, rel, w_dst.shape):
        shape = tuple(w_dst[e, rows].shape)
        pairs = [(w[e, rows], (loc[0], rel, e, rows, shape)) for w, loc in srcs]
        new[e, rows], stats[unit] = merge_expert_unit(w_dst[e, rows], pairs, rule, density, igia,
                                                      (dst_loc[0], rel, e, rows, shape))
    return new, stats


def merge_experts(model, by_target: dict[int, list[int]], f, keys, path, rule: str, density: float) -> dict:
    """In memory: merge every expert unit of the sources into the same unit of their target, in place
    (the fused-expert part of ``merge_layers``)."""
    per_layer = expert_params(model)
    if not any(per_layer.values()):
        return {}
    prefix, mt, stats = decoder_layer_prefix(model), model_type(model), {}

    def igia(loc):
        layer, rel, e, rows, shape = loc
        return module_igia(f, keys, f"{prefix}.{layer}.{rel}", shape, path, expert=e, rows=rows)

    for t in sorted(by_target):
        for rel, dst in per_layer[t].items():
            srcs = [s for s in sorted(by_target[t]) if rel in per_layer[s]]
            if not srcs:
                continue
            _, per_unit = merge_fused(dst.data, [(per_layer[s][rel], (s, rel)) for s in srcs], rule, density, igia,
                                      (t, rel), mt, out=dst.data)  # in place, unit by unit
            stats.update({f"{prefix}.{t}.{u}": {"sources": [f"{prefix}.{s}.{u}" for s in srcs], **st}
                          for u, st in per_unit.items()})
    return stats


class StreamedExperts:
    """Expert merges of the out-of-core path (``pruning.streamed``): the units, F slices and
    ``merge_module`` calls of ``merge_experts``, on checkpoint tensors (per-expert 2D ones, or the
    fused 3D ones)."""

    def __init__(self, skeleton, files):
        self.prefix, self.model_type = decoder_layer_prefix(skeleton), model_type(skeleton)
        self.units = {i: u for i, u in checkpoint_units(skeleton, files).items() if u}
        self.where = {f"{self.prefix}.{i}.{n}": (i, loc) for i, u in self.units.items() for n, loc in u.items()}

    def owns(self, name: str) -> bool:
        return name in self.where

    def merge(self, name: str, w, sources: list[str], read, merger) -> tuple[Tensor, dict]:
        """(merged tensor ``name``, stats by unit name); ``merger`` gives the rule and the factor file."""
        prefix, (i, (rel, e, rows)) = self.prefix, self.where[name]

        def igia(loc):
            layer, rel_, e_, rows_, shape = loc
            return module_igia(merger.file, merger.keys, f"{prefix}.{layer}.{rel_}", shape, merger.factors,
                               expert=e_, rows=rows_)

        srcs = [(read(s), self.where[s][0]) for s in sources]
        if e is None:  # a fused [E, out, in] tensor in the checkpoint
            new, per_unit = merge_fused(w, [(ws, (j, rel)) for ws, j in srcs], merger.rule, merger.density,
                                        igia, (i, rel), self.model_type)
            return new, {f"{prefix}.{i}.{u}": {"sources": [f"{prefix}.{j}.{u}" for _, j in srcs], **st}
                         for u, st in per_unit.items()}
        shape = tuple(w.shape)
        new, st = merge_expert_unit(w, [(ws, (j, rel, e, rows, shape)) for ws, j in srcs], merger.rule,
                                    merger.density, igia, (i, rel, e, rows, shape))
        return new, {name[: -len(".weight")]: {"sources": [s[: -len(".weight")] for s in sources], **st}}
