"""Selection by measured cost: remove layers one at a time, each time the one whose removal costs least.

SLEB / Shortened LLaMA style: at step k, for every candidate layer still present, run the model on
the calibration batches without it *and* without the k − 1 layers already removed, measure the mean
completion-token loss (``calib_loss``, the same measurement ``removal_loss`` makes for one layer), and
remove the cheapest; stop when ``target`` layers are gone. One pass over the calibration batches per
candidate per step: P + (P − 1) + … + (P − target + 1) passes for a pool of P candidates.

The pool is every layer (``greedy_loss``, ``greedy_pool: all``), the ⌈f·target⌉ layers block influence
ranks lowest (``greedy_pool: block_influence``) or the ⌈f·target⌉ layers IGIA ranks lowest
(``igia_greedy``, an IGIA variant); f = ``greedy_pool_factor``. Equal losses go to the lower guide
score (IGIA, or block influence), then the lower index.

``layer_scores`` make ``plan --prune target`` drop exactly the greedy set, and any smaller count a
prefix of the greedy order: the layer removed at step k scores k; layers never removed score above
all removed ones, the measured ones by the loss of their last trial, the never-measured (outside the
pool) above those by the guide.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from gradpruner.errors import GradPrunerError
from gradpruner.models import architectures

POOLS = ("all", "block_influence")  # greedy_loss's candidate pools (igia_greedy's is IGIA's)


def calib_loss(model, batches, keep: list[int]) -> float:
    """Mean over the calibration batches of the model's loss (next-token cross-entropy on the
    completion tokens) with only the decoder layers ``keep`` in the forward pass; no gradients."""
    with architectures.only_layers(model, keep), torch.no_grad():
        return sum(float(model(**b, use_cache=False).loss) for b in batches) / len(batches)


def pool_size(target: int, n: int, factor: float) -> int:
    """⌈factor · target⌉ candidates, at least ``target`` and at most ``n``."""
    return min(n, max(target, math.ceil(factor * target - 1e-9)))


def lowest(scores: list[float], k: int) -> list[int]:
    """The ``k`` layers with the lowest scores (ties: lower index), in layer order."""
    return sorted(sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k])


def greedy_scores(n: int, order: list[int], last_loss: dict[int, float], guide: list[float] | None) -> list[float]:
    """Layer scores that rank the greedy order first (step k → k), then the measured survivors by their
    last trial's loss, then the never-measured layers by ``guide`` (lower = earlier)."""
    g = guide or [0.0] * n
    scores = [0.0] * n
    for k, j in enumerate(order, 1):
        scores[j] = float(k)
    rest = sorted((j for j in last_loss if j not in order), key=lambda j: (last_loss[j], g[j], j))
    rest += sorted((j for j in range(n) if j not in last_loss), key=lambda j: (g[j], j))
    for r, j in enumerate(rest, len(order) + 1):
        scores[j] = float(r)
    return scores


def _checked(model, candidates, target: int, what: str) -> tuple[int, list[int]]:
    """The model's layer count and the sorted candidate layers, or a clear error for an impossible target."""
    n = len(architectures.find_decoder_layers(model)[2])
    candidates = sorted(set(candidates))
    if not 1 <= target < n:
        raise GradPrunerError(f"The greedy search removes 1 to {n - 1} of this model's {n} layers, not {target}; "
                              "give --prune N (plan.prune) within that range.")
    if target > len(candidates):
        raise GradPrunerError(f"The greedy search must remove {target} {what} but has only {len(candidates)} "
                              "candidate layers; raise --greedy-pool-factor.")
    return n, candidates


def greedy_removal(model, batches, candidates: list[int], target: int, tiebreak: list[float] | None = None,
                   desc: str = "greedy removal") -> dict:
    """Remove ``target`` of ``candidates`` one at a time, the cheapest by measured calibration loss first.

    Returns ``layer_scores`` (see the module doc), ``greedy_order`` (layers in the order removed),
    ``greedy_losses`` (the calibration loss after each removal), ``greedy_candidates``,
    ``forward_passes`` (passes over the calibration batches) and ``seconds``. The model is left whole."""
    n, candidates = _checked(model, candidates, target, "layers")
    tb = tiebreak or [0.0] * n
    start, passes = time.perf_counter(), 0
    order, losses, last = [], [], {}
    model.eval()
    bar = tqdm(total=sum(len(candidates) - k for k in range(target)), desc=desc, unit="pass")
    for _ in range(target):
        trial = {}
        for j in candidates:
            if j in order:
                continue
            trial[j] = calib_loss(model, batches, [i for i in range(n) if i != j and i not in order])
            passes += 1
            bar.update(1)
        best = min(trial, key=lambda j: (trial[j], tb[j], j))
        order.append(best)
        losses.append(trial[best])
        last.update(trial)
    bar.close()
    return {"layer_scores": greedy_scores(n, order, last, tiebreak), "greedy_order": order, "greedy_losses": losses,
            "greedy_candidates": candidates, "forward_passes": passes, "seconds": time.perf_counter() - start}


def blocks_loss(model, batches, removed) -> float:
    """``calib_loss`` with the blocks ``removed`` (ids, ``models.blocks``) out of the forward pass."""
    from gradpruner.models.blocks import without_blocks

    with without_blocks(model, removed), torch.no_grad():
        return sum(float(model(**b, use_cache=False).loss) for b in batches) / len(batches)


def block_layer_scores(n: int, order: list[list[int]]) -> list[float]:
    """Per layer, the mean step at which its two blocks went (a block never removed counts as step
    len(order) + 1): whole layers removed early rank lowest. For reports; plans read ``block_order``."""
    step = {b: k for k, unit in enumerate(order, 1) for b in unit}
    return [(step.get(2 * i, len(order) + 1) + step.get(2 * i + 1, len(order) + 1)) / 2 for i in range(n)]


def greedy_block_removal(model, batches, pool: list[int], target: int, tiebreak: list[float] | None = None,
                         desc: str = "greedy blocks") -> dict:
    """``greedy_removal`` over attention/MLP block pairs instead of layers (``models.blocks``): ``target``
    times, remove the adjacent pair of remaining blocks (a whole layer, or one layer's MLP with the next
    remaining attention) whose removal costs least, among pairs whose blocks both belong to layers in
    ``pool``. Each step removes one attention and one MLP, the parameters of one layer in a uniform model.
    Ties: the lower summed guide score of the two layers, then the lower block ids.

    Returns ``block_order`` (the pairs of block ids in the order removed), ``greedy_losses``,
    ``greedy_candidates`` (the pool), ``forward_passes``, ``seconds``, ``greedy_unit`` and
    ``layer_scores`` (``block_layer_scores``). The model is left whole."""
    from gradpruner.models.blocks import layer_mlp_side, units

    layer_mlp_side(model)  # a clear error for layers whose blocks cannot be told apart
    n, pool = _checked(model, pool, target, "block pairs")
    tb = tiebreak or [0.0] * n
    allowed = set(pool)
    start, passes, removed, order, losses = time.perf_counter(), 0, set(), [], []
    model.eval()
    bar = tqdm(total=0, desc=desc, unit="pass")
    for step in range(target):
        remaining = [b for b in range(2 * n) if b not in removed]
        pairs = [u for u in units(remaining) if u[0] // 2 in allowed and u[1] // 2 in allowed]
        # Each removal takes about two pairs off the candidates: the bar's total (and ETA) is re-estimated per step.
        bar.total = bar.n + sum(max(len(pairs) - 2 * k, 1) for k in range(target - step))
        trial = {}
        for u in pairs:
            trial[u] = blocks_loss(model, batches, removed | set(u))
            bar.update(1)
        passes += len(trial)
        if not trial:
            raise GradPrunerError(f"The greedy block search ran out of candidates after {len(order)} removals; "
                                  "raise --greedy-pool-factor.")
        best = min(trial, key=lambda u: (trial[u], tb[u[0] // 2] + tb[u[1] // 2], u))
        removed |= set(best)
        order.append(list(best))
        losses.append(trial[best])
    bar.close()
    return {"layer_scores": block_layer_scores(n, order), "block_order": order, "greedy_losses": losses,
            "greedy_candidates": pool, "greedy_unit": "block", "forward_passes": passes,
            "seconds": time.perf_counter() - start}
