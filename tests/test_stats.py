"""Intervals over held-out items (evaluation.stats) on hand-made vectors."""
import math

import numpy as np
import pytest

from gradpruner.errors import GradPrunerError
from gradpruner.evaluation.stats import (
    paired_bootstrap,
    paired_bootstrap_tasks,
    paired_scores,
    proportion_interval,
)


def test_identical_vectors_give_zero_and_a_zero_interval():
    a = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5]
    assert paired_bootstrap(a, list(a)) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("k,n", [(1, 10), (7, 50), (30, 200), (200, 200)])
def test_k_of_n_items_better_by_one(k, n):
    b = [0.0] * n
    a = [1.0] * k + [0.0] * (n - k)
    mean, low, high = paired_bootstrap(a, b)
    assert mean == pytest.approx(k / n)
    assert low <= k / n <= high and 0 <= low and high <= 1
    if k == n:  # every resample differs by exactly +1
        assert (low, high) == (1.0, 1.0)
    assert paired_bootstrap(b, a)[0] == pytest.approx(-k / n)  # the sign follows the order


def test_same_seed_same_interval_and_the_order_of_items_does_not_matter_much():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 300).astype(float), rng.integers(0, 2, 300).astype(float)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    perm = rng.permutation(300)
    one, other = paired_bootstrap(a, b), paired_bootstrap(a[perm], b[perm])
    assert one[0] == pytest.approx(other[0]) and one[1] == pytest.approx(other[1], abs=0.02)


@pytest.mark.parametrize("pa,pb,n", [(0.6, 0.5, 400), (0.3, 0.3, 900), (0.8, 0.55, 250)])
def test_interval_width_matches_the_normal_approximation(pa, pb, n):
    """Independent Bernoulli scores: the difference of one item has variance pa(1−pa) + pb(1−pb), so the
    95% interval of the mean difference is about 2·1.96·sd/√n wide."""
    sd = math.sqrt(pa * (1 - pa) + pb * (1 - pb))
    expected = 2 * 1.96 * sd / math.sqrt(n)
    rng = np.random.default_rng(7)
    for _ in range(3):
        a, b = rng.random(n) < pa, rng.random(n) < pb
        _, low, high = paired_bootstrap(a, b)
        assert high - low == pytest.approx(expected, rel=0.15)


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    trials, n, true = 200, 150, 0.7 - 0.6
    hits = 0
    for t in range(trials):
        a, b = rng.random(n) < 0.7, rng.random(n) < 0.6
        _, low, high = paired_bootstrap(a, b, n_boot=2000, seed=t)
        hits += low <= true <= high
    assert 0.89 <= hits / trials <= 0.99


def test_level_narrows_the_interval_and_bad_inputs_are_refused():
    a, b = [1.0, 0.0] * 50, [0.0, 0.0] * 50
    _, l95, h95 = paired_bootstrap(a, b)
    _, l80, h80 = paired_bootstrap(a, b, level=0.8)
    assert l95 <= l80 <= 0.5 <= h80 <= h95
    with pytest.raises(GradPrunerError, match="equally long"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(GradPrunerError, match="equally long"):
        paired_bootstrap([], [])
    with pytest.raises(GradPrunerError, match="level"):
        paired_bootstrap(a, b, level=1.5)


def test_wilson_interval_against_published_values():
    # Wilson 95% for 50/100 and 0/10 (e.g. Newcombe 1998, Table I; z = 1.959964)
    assert proportion_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert proportion_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = proportion_interval(0.81, 263)  # the interval is not symmetric about p near the ends
    assert low < 0.81 < high and 0.81 - low > high - 0.81
    with pytest.raises(GradPrunerError):
        proportion_interval(1.2, 10)


def _result(ids, values, digest="d1", task="arc_easy", metric="acc"):
    return {"task": task, "metric": metric, "item_scores": {"metric": metric, "ids": ids, "values": values, "digest": digest}}


def test_paired_scores_align_by_item_id_and_say_why_not():
    a = _result([0, 1, 2], [1.0, 0.0, 1.0])
    b = _result([2, 0, 1], [0.0, 1.0, 1.0])  # the same items in another order
    assert paired_scores(a, b) == ([1.0, 0.0, 1.0], [1.0, 1.0, 0.0])
    with pytest.raises(GradPrunerError, match="not the same held-out items"):
        paired_scores(a, _result([0, 1, 2], [1.0, 0.0, 1.0], digest="d2"))
    with pytest.raises(GradPrunerError, match="not the same held-out items"):
        paired_scores(a, _result([0, 1], [1.0, 0.0]))
    with pytest.raises(GradPrunerError, match="no per-item scores"):
        paired_scores(a, {"task": "arc_easy", "metric": "acc", "value": 0.5})
    with pytest.raises(GradPrunerError, match="different tasks or metrics"):
        paired_scores(a, _result([0, 1, 2], [1.0, 0.0, 1.0], task="piqa"))
    with pytest.raises(GradPrunerError, match="pooled"):
        paired_scores(a, {"task": "jsonl", "metric": "loss", "value": 2.0})


def test_task_average_weighs_every_task_the_same():
    # task 1: 2 items, the first better by 1 (mean +0.5); task 2: 4 items, no difference (mean 0)
    one, two = ([1.0, 0.0], [0.0, 0.0]), ([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0])
    mean, low, high = paired_bootstrap_tasks([one, two])
    assert mean == pytest.approx(0.25)  # (0.5 + 0) / 2, not the item-weighted 1 / 6
    # task 1's resampled mean is 0, 0.5 or 1 (each pair of draws), task 2's always 0: halves of those
    assert 0.0 <= low <= 0.25 <= high <= 0.5
    # a difference that is the same on every item of a task leaves no uncertainty
    assert paired_bootstrap_tasks([([1.0] * 3, [0.0] * 3), ([0.0] * 5, [0.0] * 5)]) == (0.5, 0.5, 0.5)
    assert paired_bootstrap_tasks([one])[0] == pytest.approx(0.5)  # one task: its own mean difference
    with pytest.raises(GradPrunerError, match="equally long"):
        paired_bootstrap_tasks([([1.0], [1.0, 0.0])])


def test_task_average_interval_is_as_wide_as_its_tasks_allow():
    """Two independent tasks of 400 Bernoulli(0.5) differences: the average's sd is half the root of the
    sum of the two tasks' variances of the mean, so its 95% interval is about 2·1.96·sqrt(2·v/400)/2 wide."""
    rng = np.random.default_rng(5)
    pairs = [(rng.integers(0, 2, 400).astype(float), rng.integers(0, 2, 400).astype(float)) for _ in range(2)]
    mean, low, high = paired_bootstrap_tasks(pairs)
    v = [np.var(a - b) for a, b in pairs]
    want = 2 * 1.96 * math.sqrt(sum(x / 400 for x in v)) / 2
    assert high - low == pytest.approx(want, rel=0.1)
