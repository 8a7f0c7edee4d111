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


def greedy_removal(model, batches, candidates: list[int], target: int, tiebreak: list[float] | None = None,
                   desc: str = "greedy removal") -> dict:
    """Remove ``target`` of ``candidates`` one at a time, the cheapest by measured calibration loss first.

    Returns ``layer_scores`` (see the module doc), ``greedy_order`` (layers in the order removed),
    ``greedy_losses`` (the calibration loss after each removal), ``greedy_candidates``,
    ``forward_passes`` (passes over the calibration batches) and ``seconds``. The model is left whole."""
    n = len(architectures.find_decoder_layers(model)[2])
    candidates = sorted(set(candidates))
    if not 1 <= target < n:
        raise GradPrunerError(f"The greedy search removes 1 to {n - 1} of this model's {n} layers, not {target}; "
                              "give --prune N (plan.prune) within that range.")
    if target > len(candidates):
        raise GradPrunerError(f"The greedy search must remove {target} layers but has only {len(candidates)} "
                              "candidates; raise --greedy-pool-factor.")
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
