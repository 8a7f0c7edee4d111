"""The plan rule (GUIDE §1.5), plan validation and the plan summary."""
from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpruner.errors import GradPrunerError
from gradpruner.planning.plans import (
    layers_for_target,
    make_plan,
    plan_summary,
    validate_plan,
)


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


# ---------------------------------------------------------------- make_plan


def test_lowest_dropped_highest_of_those_merged_into_preceding_kept():
    #          0    1    2    3    4    5    6    7
    scores = [9.0, 8.0, 1.0, 7.0, 2.0, 3.0, 6.0, 0.5]
    plan = make_plan(scores, prune=4, merge=2)
    # lowest four: 7 (0.5), 2 (1.0), 4 (2.0), 5 (3.0); the two highest of those: 5 and 4
    assert plan["drop"] == [2, 4, 5, 7]
    assert plan["keep"] == [0, 1, 3, 6]
    assert plan["merge"] == {"4": 3, "5": 3}
    assert plan["num_layers"] == 8
    assert plan["layer_scores"] == scores
    assert "params" not in plan
    json.dumps(plan)  # plain data


def test_merge_zero_and_prune_zero():
    plan = make_plan([3.0, 1.0, 2.0], prune=1)
    assert plan["drop"] == [1] and plan["merge"] == {}
    plan = make_plan([3.0, 1.0, 2.0], prune=0)
    assert plan["drop"] == [] and plan["keep"] == [0, 1, 2]


def test_dropped_layer_zero_merges_into_following_kept():
    plan = make_plan([0.0, 5.0, 6.0, 7.0], prune=1, merge=1)
    assert plan["drop"] == [0] and plan["merge"] == {"0": 1}


def test_dropped_leading_block_merges_into_first_kept():
    plan = make_plan([0.1, 0.2, 5.0, 1.0, 6.0], prune=3, merge=2)
    # dropped 0, 1, 3; merged the two highest: 1 (0.2) and 3 (1.0)
    assert plan["drop"] == [0, 1, 3]
    assert plan["merge"] == {"1": 2, "3": 2}


def test_merge_target_skips_other_dropped_layers():
    plan = make_plan([5.0, 0.0, 0.1, 0.2, 5.0], prune=3, merge=3)
    assert plan["merge"] == {"1": 0, "2": 0, "3": 0}


def test_ties_broken_by_lower_index_first():
    plan = make_plan([1.0] * 6, prune=3, merge=1)
    # equal scores: lower index ranks as less important, so 0, 1, 2 go; 2 ranks highest of them
    assert plan["drop"] == [0, 1, 2]
    assert plan["merge"] == {"2": 3}
    assert make_plan([1.0] * 6, prune=3, merge=1) == plan  # deterministic


def test_paper_shape_32_layers_prune_13_merge_3():
    # the authors' hard-coded plan: 18..30 pruned, 18/19/30 merged into 17
    scores = [100.0 + i for i in range(32)]
    for rank, layer in enumerate([20, 21, 22, 23, 24, 25, 26, 27, 28, 29]):
        scores[layer] = float(rank)
    scores[18], scores[19], scores[30] = 10.0, 11.0, 12.0
    params = [200] * 32
    plan = make_plan(scores, prune=13, merge=3, layer_params=params, total_params=10_000)
    assert plan["drop"] == list(range(18, 31))
    assert plan["keep"] == list(range(18)) + [31]
    assert plan["merge"] == {"18": 17, "19": 17, "30": 17}
    assert plan["params"] == {"total_before": 10_000, "total_after": 10_000 - 13 * 200,
                              "removed_fraction": 0.26}
    assert validate_plan(plan, 32) == plan


def test_params_default_total_is_sum_of_layers():
    plan = make_plan([1.0, 2.0, 3.0, 4.0], prune=1, layer_params=[10, 20, 30, 40])
    assert plan["params"] == {"total_before": 100, "total_after": 90, "removed_fraction": 0.1}


@pytest.mark.parametrize("prune, merge, needle", [
    (4, 0, "at least one layer must stay"),
    (5, 0, "--prune 5"),
    (-1, 0, "--prune"),
    (2, 3, "--merge 3 is larger than --prune 2"),
    (2, -1, "--merge"),
    (True, 0, "--prune"),
])
def test_make_plan_argument_errors(prune, merge, needle):
    with pytest.raises(GradPrunerError, match=needle):
        make_plan([1.0, 2.0, 3.0, 4.0], prune=prune, merge=merge)


@pytest.mark.parametrize("scores", [[1.0, math.nan], [math.inf, 1.0], [1.0, "x"], [], None])
def test_make_plan_rejects_bad_scores(scores):
    with pytest.raises(GradPrunerError, match="layer_scores"):
        make_plan(scores, prune=0)


def test_make_plan_rejects_bad_params():
    with pytest.raises(GradPrunerError, match="layer_params"):
        make_plan([1.0, 2.0], 1, layer_params=[1])
    with pytest.raises(GradPrunerError, match="total_params"):
        make_plan([1.0, 2.0], 1, layer_params=[5, 5], total_params=3)


# ---------------------------------------------------------------- layers_for_target


def test_layers_for_target_picks_smallest_n():
    scores = [5.0, 1.0, 2.0, 3.0, 4.0]   # removal order: 1, 2, 3, 4, 0
    params = [10, 10, 20, 30, 10]
    total = 100
    assert layers_for_target(scores, params, total, 0.10) == 1   # 10 >= 10
    assert layers_for_target(scores, params, total, 0.11) == 2   # 30
    assert layers_for_target(scores, params, total, 0.30) == 2
    assert layers_for_target(scores, params, total, 0.31) == 3   # 60
    assert layers_for_target(scores, params, total, 0.70) == 4   # 70
    n = layers_for_target(scores, params, total, 0.31)
    assert make_plan(scores, n, layer_params=params, total_params=total)["params"]["removed_fraction"] >= 0.31


def test_layers_for_target_unreachable_names_maximum():
    with pytest.raises(GradPrunerError, match=r"only 0\.7000"):
        layers_for_target([5.0, 1.0, 2.0, 3.0, 4.0], [10, 10, 20, 30, 10], 100, 0.75)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan])
def test_layers_for_target_fraction_range(fraction):
    with pytest.raises(GradPrunerError, match="--target-params"):
        layers_for_target([1.0, 2.0], [1, 1], 2, fraction)


# ---------------------------------------------------------------- validate_plan


def good_plan():
    return {"num_layers": 6, "keep": [0, 1, 3, 5], "drop": [2, 4], "merge": {"4": 3},
            "layer_scores": None, "rule": "hand-written"}


def test_hand_written_plan_passes_and_is_normalised():
    plan = {"num_layers": 6, "keep": [5, 3, 1, 0], "drop": [4, 2], "merge": {4: 3, "2": 5},
            "note": "kept as is"}
    before = copy.deepcopy(plan)
    out = validate_plan(plan, num_layers=6)
    assert out["keep"] == [0, 1, 3, 5] and out["drop"] == [2, 4]
    assert out["merge"] == {"2": 5, "4": 3}
    assert out["note"] == "kept as is"
    assert plan == before  # input untouched
    assert validate_plan(good_plan())["merge"] == {"4": 3}


def test_merge_is_optional():
    plan = good_plan()
    del plan["merge"]
    assert validate_plan(plan)["merge"] == {}


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p.pop("keep"), "lacks the key(s) 'keep'"),
    (lambda p: p.pop("num_layers"), "lacks the key(s) 'num_layers'"),
    (lambda p: p.update(keep=[0, 1, "3", 5]), "non-integer layer indices '3'"),
    (lambda p: p.update(keep=[0, 1, 3.0, 5]), "non-integer layer indices 3.0"),
    (lambda p: p.update(keep=[0, True, 3, 5]), "non-integer layer indices True"),
    (lambda p: p.update(keep=[0, 1, 3, 5, 9]), "outside 0..5"),
    (lambda p: p.update(drop=[2, 4, -1]), "outside 0..5"),
    (lambda p: p.update(keep=[0, 1, 1, 3, 5]), "'keep' lists layers 1 more than once"),
    (lambda p: p.update(drop=[2, 4, 4]), "'drop' lists layers 4 more than once"),
    (lambda p: p.update(keep=[0, 1, 2, 3, 5]), "in both 'keep' and 'drop'"),
    (lambda p: p.update(keep=[0, 3, 5]), "Layers 1 are in neither"),
    (lambda p: p.update(keep=[], drop=[0, 1, 2, 3, 4, 5], merge={}), "'keep' is empty"),
    (lambda p: p.update(merge={"3": 1}), "layer 3 as a source, but it is not in 'drop'"),
    (lambda p: p.update(merge={"4": 2}), "merges into a removed layer"),
    (lambda p: p.update(merge={"4": 17}), "merges into layer 17, which is outside"),
    (lambda p: p.update(merge={"four": 3}), "'merge' key 'four' is not a layer index"),
    (lambda p: p.update(merge={"4": "3"}), "not a layer index"),
    (lambda p: p.update(merge=[[4, 3]]), "must map removed layers"),
    (lambda p: p.update(keep="0,1,3,5"), "must be a list of layer indices"),
    (lambda p: p.update(num_layers=0), "'num_layers' must be a positive integer"),
    (lambda p: p.update(num_layers=True), "'num_layers' must be a positive integer"),
    (lambda p: p.update(layer_scores=[1.0, 2.0]), "'layer_scores' has 2 entries for 6 layers"),
    (lambda p: p.update(params={"total_before": "a lot"}), "'params' must be null"),
    (lambda p: p.update(rule=3), "'rule' must be a string"),
    (lambda p: p.update(merges={"4": 3}), "'merges' is not a plan key; did you mean 'merge'"),
])
def test_each_inconsistency_is_named(edit, needle):
    plan = good_plan()
    edit(plan)
    with pytest.raises(GradPrunerError) as excinfo:
        validate_plan(plan)
    assert any(needle in p for p in problems_of(excinfo)), problems_of(excinfo)


def test_model_layer_count_mismatch():
    with pytest.raises(GradPrunerError,
                       match="plan was made for a model with 6 layers, this model has 8"):
        validate_plan(good_plan(), num_layers=8)


def test_several_problems_reported_at_once():
    plan = {"num_layers": 6, "keep": [0, 0, 9, "x"], "drop": [2, 4], "merge": {"1": 2}}
    with pytest.raises(GradPrunerError) as excinfo:
        validate_plan(plan, num_layers=7)
    text = "\n".join(problems_of(excinfo))
    for needle in ("non-integer", "more than once", "outside 0..6", "neither",
                   "not in 'drop'", "merges into a removed layer", "6 layers, this model has 7"):
        assert needle in text
    assert len(problems_of(excinfo)) >= 7
    assert str(excinfo.value).count("\n") == len(problems_of(excinfo)) - 1


def test_not_a_dict():
    for bad in (None, [], "plan", 3):
        with pytest.raises(GradPrunerError, match="JSON object"):
            validate_plan(bad)


def test_huge_num_layers_does_not_hang():
    with pytest.raises(GradPrunerError, match="in neither"):
        validate_plan({"num_layers": 10**18, "keep": [0], "drop": []})


# ---------------------------------------------------------------- plan_summary


def test_plan_summary():
    scores = [5.0, 4.0, 0.1, 0.2, 3.0, 0.3]
    plan = make_plan(scores, prune=3, merge=1, layer_params=[100] * 6, total_params=1000)
    text = plan_summary(plan)
    assert "Layers: 6 -> 3 (3 removed, 1 of them merged)" in text
    assert "Kept (3): 0-1, 4" in text
    assert "Dropped (3): 2-3, 5" in text
    assert "Merged: 5 -> 4" in text
    assert "Parameters: 1,000 -> 700 (30.0% removed)" in text
    text = plan_summary(good_plan())
    assert "Merged: 4 -> 3" in text and "Parameters" not in text


# ---------------------------------------------------------------- properties


@st.composite
def plan_args(draw):
    n = draw(st.integers(1, 40))
    scores = draw(st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, 1.0])),
                           min_size=n, max_size=n))
    prune = draw(st.integers(0, n - 1))
    merge = draw(st.integers(0, prune))
    return scores, prune, merge


@settings(max_examples=300, deadline=None)
@given(plan_args())
def test_make_plan_output_is_a_valid_partition(args):
    scores, prune, merge = args
    n = len(scores)
    plan = make_plan(scores, prune, merge)
    assert validate_plan(json.loads(json.dumps(plan)), n) == plan
    assert sorted(plan["keep"] + plan["drop"]) == list(range(n))
    assert len(plan["drop"]) == prune and len(plan["merge"]) == merge
    # every dropped layer scores no higher than any kept one
    if plan["drop"]:
        assert max(scores[d] for d in plan["drop"]) <= min(scores[k] for k in plan["keep"])
    for src, dst in plan["merge"].items():
        src = int(src)
        assert src in plan["drop"] and dst in plan["keep"]
        preceding = [k for k in plan["keep"] if k < src]
        if preceding:
            assert dst == max(preceding)
        else:
            assert dst == min(k for k in plan["keep"] if k > src)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.integers(),
                      st.floats(allow_nan=True), st.text(max_size=5))
json_like = st.recursive(
    json_leaf,
    lambda kids: st.one_of(st.lists(kids, max_size=5),
                           st.dictionaries(st.text(max_size=5), kids, max_size=5)),
    max_leaves=25)
plan_key = st.sampled_from(["num_layers", "keep", "drop", "merge", "layer_scores", "params",
                            "rule", "merges", "kep", "other"])
index_list = st.lists(st.one_of(st.integers(-2, 12), json_leaf), max_size=12)
plan_value = st.one_of(json_like, index_list, st.integers(-1, 12),
                       st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-2, 12).map(str)),
                                       st.one_of(st.integers(-2, 12), json_leaf), max_size=4))


@st.composite
def mutated_plan(draw):
    """A valid plan with a few fields replaced, deleted or added: reaches both outcomes."""
    scores, prune, merge = draw(plan_args())
    plan = json.loads(json.dumps(make_plan(scores, prune, merge)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(plan_key)
        action = draw(st.sampled_from(["set", "delete", "append"]))
        if action == "set":
            plan[key] = draw(plan_value)
        elif action == "delete":
            plan.pop(key, None)
        elif isinstance(plan.get(key), list):
            plan[key].append(draw(st.one_of(st.integers(-1, 41), json_leaf)))
    return plan


plan_like = st.one_of(json_like, st.dictionaries(plan_key, plan_value, max_size=8), mutated_plan())


@settings(max_examples=500, deadline=None)
@given(plan_like, st.one_of(st.none(), st.integers(1, 12)))
def test_validate_plan_never_crashes(plan, num_layers):
    before = copy.deepcopy(plan)
    try:
        out = validate_plan(plan, num_layers)
    except GradPrunerError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
    else:
        assert sorted(out["keep"] + out["drop"]) == list(range(out["num_layers"]))
        plan_summary(out)
    assert repr(plan) == repr(before)  # NaN-safe equality


def test_constraints_protect_the_last_layers_and_limit_blocks():
    from gradpruner.planning.plans import make_plan

    scores = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5]  # deepest least important
    assert make_plan(scores, 4)["drop"] == [6, 7, 8, 9]
    assert make_plan(scores, 4, protect_last=2)["drop"] == [4, 5, 6, 7]
    # at most 2 consecutive: 9, 8 then 7 would make 3 -> skip; 6 ok? 6,(7 kept),8,9 -> yes
    assert make_plan(scores, 4, max_block=2)["drop"] == [5, 6, 8, 9]
    p = make_plan(scores, 3, merge=1, protect_last=1, max_block=1)
    assert p["drop"] == [4, 6, 8] and p["merge"] == {"4": 3} and "never the last 1" in p["rule"]
    with pytest.raises(GradPrunerError, match="relax"):
        make_plan(scores, 6, max_block=1)
    with pytest.raises(GradPrunerError, match="protect_last"):
        make_plan(scores, 2, protect_last=10)
