"""How sure a difference between two evaluations is: intervals over the held-out items.

* ``paired_bootstrap``: the mean difference of two methods' per-item scores on the same items, with a
  percentile bootstrap interval that resamples the items (both methods' scores of an item stay together,
  so what the items have in common — easy and hard questions — cancels out).
* ``proportion_interval``: the Wilson interval of one accuracy.
* ``paired_scores``: the two per-item score lists of two evaluations, aligned by item id, after checking
  that both evaluated the same items (``evaluate(..., item_scores=True)`` writes them).

A difference is resolved only when its interval excludes 0 (docs/evaluation.md).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from gradpruner.errors import GradPrunerError


def paired_bootstrap(a, b, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a − b, low, high): the percentile bootstrap interval at ``level`` of the mean per-item
    difference, resampling item indices with replacement ``n_boot`` times (numpy generator ``seed``).

    ``a`` and ``b`` are the per-item scores of two methods on the same items, in the same order."""
    d = _differences(a, b, "paired_bootstrap")
    _check_level(level, n_boot, "paired_bootstrap")
    means = _resampled_means(d, n_boot, np.random.default_rng(seed))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def _differences(a, b, who: str) -> np.ndarray:
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or np.shape(a) != np.shape(b) or d.size == 0:
        raise GradPrunerError(f"{who} needs two equally long, non-empty lists of per-item scores "
                              f"(got {np.shape(a)} and {np.shape(b)}).")
    return d


def _check_level(level: float, n_boot: int, who: str) -> None:
    if not 0 < level < 1 or n_boot < 1:
        raise GradPrunerError(f"{who} needs 0 < level < 1 and n_boot ≥ 1 (got {level}, {n_boot}).")


def _resampled_means(d: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """The mean of ``d`` over ``n_boot`` resamples of its items with replacement."""
    n, means = d.size, np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # resample in blocks: at most ~16 MB of indices at a time
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        means[start:start + size] = d[rng.integers(0, n, size=(size, n))].mean(axis=1)
    return means


def paired_bootstrap_tasks(pairs, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean over tasks of each task's mean a − b, low, high): ``pairs`` holds one (a, b) of per-item
    scores per task; every resample draws each task's items with replacement from that task alone, so
    each task weighs the same however many items it has (the average a table shows beside the tasks)."""
    if not pairs:
        raise GradPrunerError("paired_bootstrap_tasks needs at least one task's per-item scores.")
    diffs = [_differences(a, b, "paired_bootstrap_tasks") for a, b in pairs]
    _check_level(level, n_boot, "paired_bootstrap_tasks")
    rng = np.random.default_rng(seed)
    means = sum(_resampled_means(d, n_boot, rng) for d in diffs) / len(diffs)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(np.mean([d.mean() for d in diffs])), float(low), float(high)


def proportion_interval(p: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a proportion ``p`` observed on ``n`` items."""
    if n < 1 or not 0 <= p <= 1:
        raise GradPrunerError(f"proportion_interval needs 0 ≤ p ≤ 1 and n ≥ 1 (got p={p}, n={n}).")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_scores(a: dict, b: dict) -> tuple[list[float], list[float]]:
    """The per-item scores of two evaluation results (``evaluate`` output), aligned by item id.

    Raises GradPrunerError saying why they cannot be paired: a result without ``item_scores`` (written
    before they were kept), a pooled metric, different tasks or metrics, or different items."""
    for r in (a, b):
        if r.get("metric") == "loss":
            raise GradPrunerError("loss is pooled over completion tokens, so it has no per-item scores to pair")
    sa, sb = a.get("item_scores"), b.get("item_scores")
    if not sa or not sb:
        raise GradPrunerError("no per-item scores (evaluated before they were kept; delete the evaluation's "
                              "stage record to evaluate again)")
    if (a.get("task"), sa.get("metric")) != (b.get("task"), sb.get("metric")):
        raise GradPrunerError(f"different tasks or metrics ({a.get('task')} {sa.get('metric')} vs "
                              f"{b.get('task')} {sb.get('metric')})")
    if sa.get("digest") != sb.get("digest") or sorted(sa["ids"]) != sorted(sb["ids"]):
        raise GradPrunerError("not the same held-out items (limit, offset or data differ)")
    by_id = dict(zip(sb["ids"], sb["values"]))
    return [float(v) for v in sa["values"]], [float(by_id[i]) for i in sa["ids"]]
