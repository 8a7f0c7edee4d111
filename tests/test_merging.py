"""Sparsification and the merge rules, against hand-written values and element-wise loop references."""
from __future__ import annotations

import math

import pytest
import torch

from gradpruner.errors import GradPrunerError
from gradpruner.pruning.merging import (
    MERGE_RULES,
    TRIM,
    fisher,
    laco,
    magnitude_trim,
    merge_layers,
    merge_module,
    needs_igia,
    none,
    sign_mean,
    sign_sum,
    sparsify,
    ties,
    weighted_average,
)


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


# ---------------------------------------------------------------- element-wise references


def ref_sparsify(w, f, density):
    n = w.numel()
    k = max(1, round(density * n))
    flat_w, flat_f = w.flatten().tolist(), f.flatten().tolist()
    # k largest F; on ties the lower flat index wins (sorted() is stable)
    chosen = set(sorted(range(n), key=lambda i: -flat_f[i])[:k])
    return torch.tensor([flat_w[i] if i in chosen else 0.0 for i in range(n)],
                        dtype=w.dtype).view_as(w)


def ref_rule(rule, w_dst, sources, f_dst=None, lam=1.0):
    wd = w_dst.flatten().tolist()
    fd = f_dst.flatten().tolist() if f_dst is not None else None
    srcs = [(w.flatten().tolist(), f.flatten().tolist()) for w, f in sources]
    out = []
    for j, d in enumerate(wd):
        matched = [(w[j], f[j]) for w, f in srcs if w[j] != 0 and sgn(w[j]) == sgn(d)]
        if not matched:
            out.append(d)
        elif rule == "sign_sum":
            out.append(d + lam * sum(v for v, _ in matched))
        elif rule == "sign_mean" or (rule == "fisher" and 0.5 * fd[j] + sum(0.5 * g for _, g in matched) == 0):
            out.append((d + sum(v for v, _ in matched)) / (1 + len(matched)))
        else:
            num = 0.5 * fd[j] * d + sum(0.5 * g * v for v, g in matched)
            den = 0.5 * fd[j] + sum(0.5 * g for _, g in matched)
            out.append(num / den)
    return torch.tensor(out, dtype=torch.float64).view_as(w_dst)


# ---------------------------------------------------------------- sparsify


def test_sparsify_keeps_exactly_top_k_by_f():
    w = T([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]])
    f = T([[0.1, 0.9, 0.3], [0.8, 0.2, 0.05]])
    assert torch.equal(sparsify(w, f, 0.5), T([[0.0, -2.0, 3.0], [4.0, 0.0, 0.0]]))
    assert torch.equal(sparsify(w, f, 1 / 6), T([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(sparsify(w, f, 1.0), w)
    # k = max(1, round(0.01 * 6)) = 1
    assert torch.equal(sparsify(w, f, 0.01), T([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0]]))


def test_sparsify_exact_k_with_ties_lower_index_first():
    w = torch.arange(1.0, 11.0)
    f = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 1.0, 2.0, 3.0, 0.0])
    out = sparsify(w, f, 0.3)
    assert torch.count_nonzero(out) == 3
    assert torch.equal(out, torch.tensor([0, 2.0, 3.0, 4.0, 0, 0, 0, 0, 0, 0]))
    all_equal = sparsify(w, torch.ones(10), 0.2)
    assert torch.equal(all_equal, torch.tensor([1.0, 2.0] + [0.0] * 8))


def test_sparsify_matches_reference_on_random():
    g = torch.Generator().manual_seed(0)
    for density in (0.2, 0.5, 0.8, 1.0):
        w = torch.randn(5, 7, generator=g)
        f = torch.rand(5, 7, generator=g).round(decimals=1)  # plenty of ties
        assert torch.equal(sparsify(w, f, density), ref_sparsify(w, f, density))


@pytest.mark.parametrize("density", [0, -0.1, 1.01, math.nan, True, "0.2"])
def test_sparsify_density_errors(density):
    with pytest.raises(GradPrunerError, match=r"--density must be in \(0, 1\]"):
        sparsify(torch.ones(3), torch.ones(3), density)


def test_sparsify_rejects_shape_mismatch_and_nan():
    with pytest.raises(GradPrunerError, match="shape"):
        sparsify(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(GradPrunerError, match="NaN"):
        sparsify(torch.ones(3), torch.tensor([1.0, math.nan, 0.0]), 0.5)


# ---------------------------------------------------------------- sign_sum


def test_sign_sum_lambda_one_and_half():
    w_dst = T([[1.0, -1.0, 2.0], [-3.0, 0.0, 4.0]])
    w_hat = T([[0.5, 0.5, -1.0], [-2.0, 7.0, 0.0]])
    # entry by entry:  match, opposite, opposite / match, W_dst == 0 (sign 0 is no match), unselected
    src = [(w_hat, torch.ones(2, 3))]
    assert torch.equal(sign_sum(w_dst, src), T([[1.5, -1.0, 2.0], [-5.0, 0.0, 4.0]]))
    assert torch.equal(sign_sum(w_dst, src, lam=0.5), T([[1.25, -1.0, 2.0], [-4.0, 0.0, 4.0]]))


def test_sign_sum_each_source_compared_with_original_sign():
    w_dst = T([1.0, -1.0, 1.0])
    a = T([-3.0, -2.0, 0.0])
    b = T([1.0, 5.0, 2.0])
    # entry 0: the sources' own majority sign (sign of a + b) is negative, as a TIES-style elected
    # sign would use; here only b, which agrees with W_dst, is added.
    out = sign_sum(w_dst, [(a, torch.ones(3)), (b, torch.ones(3))])
    assert torch.equal(out, T([2.0, -3.0, 3.0]))
    assert torch.equal(out, ref_rule("sign_sum", w_dst, [(a, torch.ones(3)), (b, torch.ones(3))]).float())


def test_sign_sum_rejects_bad_lambda():
    with pytest.raises(GradPrunerError, match="lambda"):
        sign_sum(torch.ones(2), [], lam=math.inf)


# ---------------------------------------------------------------- sign_mean and fisher


def test_sign_mean_by_hand():
    w_dst = T([2.0, -2.0, 2.0, 0.0, 2.0])
    a = T([4.0, 1.0, 0.0, 3.0, 6.0])
    b = T([0.0, -4.0, 0.0, 3.0, 1.0])
    out = sign_mean(w_dst, [(a, torch.ones(5)), (b, torch.ones(5))])
    assert torch.equal(out, T([3.0, -3.0, 2.0, 0.0, 3.0]))


def test_fisher_by_hand():
    w_dst = T([2.0, 2.0, 2.0, -1.0])
    f_dst = T([1.0, 0.0, 3.0, 0.0])
    w_hat = T([4.0, 4.0, -4.0, -3.0])
    f_src = T([3.0, 1.0, 1.0, 0.0])
    out = fisher(w_dst, [(w_hat, f_src)], f_dst)
    # (0.5·1·2 + 0.5·3·4)/(0.5·1 + 0.5·3) = 3.5; F_dst = 0 -> source alone = 4;
    # opposite sign -> W_dst; denominator 0 -> sign_mean's (−1 − 3)/2 = −2
    assert torch.equal(out, T([3.5, 4.0, 2.0, -2.0]))


def test_fisher_needs_f_dst():
    with pytest.raises(GradPrunerError, match="f_dst"):
        fisher(torch.ones(2), [(torch.ones(2), torch.ones(2))], None)
    with pytest.raises(GradPrunerError, match="f_dst"):
        merge_module(torch.ones(2), [(torch.ones(2), torch.ones(2))], "fisher", 0.5)


@pytest.mark.parametrize("rule", ["sign_sum", "sign_mean", "fisher"])
@pytest.mark.parametrize("n_src", [1, 3])
def test_rules_match_loop_reference_on_random(rule, n_src):
    g = torch.Generator().manual_seed(n_src)
    w_dst = torch.randn(5, 7, generator=g)
    w_dst[0, :3] = 0.0  # zeros in W_dst are never merged
    f_dst = torch.rand(5, 7, generator=g)
    f_dst[1, :] = 0.0   # some zero Fisher weights in the target
    srcs = []
    for _ in range(n_src):
        f = torch.rand(5, 7, generator=g)
        f[2, :4] = 0.0  # and zero-F selected entries in the sources -> zero denominators
        srcs.append((torch.randn(5, 7, generator=g), f))
    sparse = [(ref_sparsify(w, f, 0.6), f) for w, f in srcs]
    expected = ref_rule(rule, w_dst, sparse, f_dst)
    direct = MERGE_RULES[rule](w_dst, sparse, f_dst=f_dst)
    torch.testing.assert_close(direct.double(), expected, rtol=1e-6, atol=1e-6)
    new, stats = merge_module(w_dst, srcs, rule, 0.6, f_dst=f_dst)
    torch.testing.assert_close(new.double(), expected, rtol=1e-6, atol=1e-6)
    assert stats["entries"] == 35
    assert stats["kept_per_source"] == [int(torch.count_nonzero(s)) for s, _ in sparse] == [21] * n_src
    wd = w_dst.flatten().tolist()
    assert stats["merged_per_source"] == [
        sum(1 for v, d in zip(s.flatten().tolist(), wd) if v != 0 and sgn(v) == sgn(d))
        for s, _ in sparse]
    changed = sum(1 for a, b in zip(new.flatten().tolist(), wd) if a != b)
    assert stats["changed_fraction"] == changed / 35
    assert 0 < changed < 35


# ---------------------------------------------------------------- merge_module


def test_merge_module_preserves_bf16():
    g = torch.Generator().manual_seed(3)
    w_dst = torch.randn(4, 6, generator=g).bfloat16()
    srcs = [(torch.randn(4, 6, generator=g).bfloat16(), torch.rand(4, 6, generator=g).bfloat16())]
    for rule in MERGE_RULES:
        new, _ = merge_module(w_dst, srcs, rule, 0.5, f_dst=torch.rand(4, 6, generator=g).bfloat16())
        assert new.dtype == torch.bfloat16 and new.shape == w_dst.shape
    expected = ref_rule("sign_sum", w_dst.float(),
                        [(ref_sparsify(srcs[0][0].float(), srcs[0][1].float(), 0.5), srcs[0][1].float())])
    assert torch.equal(merge_module(w_dst, srcs, "sign_sum", 0.5)[0], expected.bfloat16())


def test_inputs_not_modified():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(5, 7, generator=g) for _ in range(5)]
    w_dst, w1, f1, w2, f2 = tensors
    f1, f2 = f1.abs(), f2.abs()
    f_dst = torch.rand(5, 7, generator=g)
    inputs = [w_dst, w1, f1, w2, f2, f_dst]
    copies = [t.clone() for t in inputs]
    for rule in MERGE_RULES:
        new, _ = merge_module(w_dst, [(w1, f1), (w2, f2)], rule, 0.3, f_dst=f_dst)
        assert new.data_ptr() != w_dst.data_ptr()
        sp = sparsify(w1, f1, 0.3)
        MERGE_RULES[rule](w_dst, [(sp, f1)], f_dst=f_dst)
    for t, c in zip(inputs, copies):
        assert torch.equal(t, c)
    # even with no sources the result is a new tensor equal to w_dst
    new, stats = merge_module(w_dst, [], "sign_sum", 0.3)
    assert torch.equal(new, w_dst) and new.data_ptr() != w_dst.data_ptr()
    assert stats == {"entries": 35, "kept_per_source": [], "merged_per_source": [],
                     "changed_fraction": 0.0}


def test_merge_module_shape_errors():
    with pytest.raises(GradPrunerError, match=r"Merge source 0's weight has shape \(3, 2\)"):
        merge_module(torch.ones(2, 3), [(torch.ones(3, 2), torch.ones(3, 2))], "sign_sum", 0.2)
    with pytest.raises(GradPrunerError, match="IGIA matrix has shape"):
        merge_module(torch.ones(2, 3), [(torch.ones(2, 3), torch.ones(6))], "sign_sum", 0.2)
    with pytest.raises(GradPrunerError, match="kept module's IGIA matrix"):
        merge_module(torch.ones(2, 3), [], "fisher", 0.2, f_dst=torch.ones(3))


def test_merge_module_density_error():
    with pytest.raises(GradPrunerError, match=r"--density must be in \(0, 1\]"):
        merge_module(torch.ones(2), [(torch.ones(2), torch.ones(2))], "sign_sum", 0.0)


def test_unknown_rule_did_you_mean():
    with pytest.raises(GradPrunerError, match="Unknown merge rule 'sign_meen'.*Did you mean 'sign_mean'"):
        merge_module(torch.ones(2), [], "sign_meen", 0.2)


# ---------------------------------------------------------------- weighted_average, ties, none, laco


def test_registry_and_needs_igia():
    assert set(MERGE_RULES) == set(TRIM) == {"sign_sum", "sign_mean", "fisher", "weighted_average",
                                             "ties", "none", "laco"}
    assert {r for r in MERGE_RULES if needs_igia(r)} == {"sign_sum", "sign_mean", "fisher",
                                                         "weighted_average"}
    with pytest.raises(GradPrunerError, match="Unknown merge rule 'lacoo'.*Did you mean 'laco'"):
        needs_igia("lacoo")


def test_weighted_average_by_hand():
    w_dst = T([2.0, -2.0, 2.0, 0.0, 2.0])
    a = T([4.0, 1.0, 0.0, 3.0, 6.0])
    b = T([0.0, -4.0, 0.0, 3.0, 1.0])
    out = weighted_average(w_dst, [(a, None), (b, None)])
    # entry 1: a = +1 is opposite to W_dst = −2 and still averaged (sign_mean would skip it):
    # (−2 + 1 − 4)/3; entry 2: no source selected -> W_dst; entry 3: W_dst = 0 is averaged too.
    expected = T([(2 + 4) / 2, (-2 + 1 - 4) / 3, 2.0, (0 + 3 + 3) / 3, (2 + 6 + 1) / 3])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.equal(out, sign_mean(w_dst, [(a, None), (b, None)]))
    # through merge_module the sources are IGIA-sparsified first: F keeps a's entries 0 and 1 only
    f = T([5.0, 4.0, 0.0, 1.0, 0.0])
    new, stats = merge_module(w_dst, [(a, f)], "weighted_average", 0.4)
    assert torch.equal(new, T([3.0, -0.5, 2.0, 0.0, 2.0]))
    assert stats["kept_per_source"] == [2] and stats["merged_per_source"] == [2]


# TIES by hand, 3×3, density 4/9 -> k = 4 entries of each source kept by |W|; W_dst is not trimmed.
TIES_DST = T([[1.0, -2.0, 3.0], [2.5, 1.0, -1.0], [2.0, 2.0, -4.0]])
TIES_A = T([[3.0, 1.0, -5.0], [2.0, -0.5, 4.0], [-0.1, 6.0, 0.2]])  # top |A|: 6, 5, 4, 3
TIES_B = T([[-2.0, -3.0, 0.5], [-2.5, 0.3, 0.1], [-6.0, 0.2, -7.0]])  # top |B|: 7, 6, 3, 2.5
TIES_A_HAT = T([[3.0, 0.0, -5.0], [0.0, 0.0, 4.0], [0.0, 6.0, 0.0]])
TIES_B_HAT = T([[0.0, -3.0, 0.0], [-2.5, 0.0, 0.0], [-6.0, 0.0, -7.0]])
#  entry  (W_dst, Â, B̂)       sum    s   values with sign s   result
#  (0,0)  ( 1,    3,  0  )     4     +   1, 3                  2
#  (0,1)  (−2,    0, −3  )    −5     −   −2, −3               −2.5
#  (0,2)  ( 3,   −5,  0  )    −2     −   −5 (W_dst outvoted)  −5
#  (1,0)  ( 2.5,  0, −2.5)     0     0   keep W_dst            2.5
#  (1,1)  ( 1,    0,  0  )     1     +   1                     1
#  (1,2)  (−1,    4,  0  )     3     +   4                     4
#  (2,0)  ( 2,    0, −6  )    −4     −   −6                   −6
#  (2,1)  ( 2,    6,  0  )     8     +   2, 6                  4
#  (2,2)  (−4,    0, −7  )   −11     −   −4, −7               −5.5
TIES_EXPECTED = T([[2.0, -2.5, -5.0], [2.5, 1.0, 4.0], [-6.0, 4.0, -5.5]])


def test_ties_by_hand():
    assert torch.equal(magnitude_trim(TIES_A, 4 / 9), TIES_A_HAT)
    assert torch.equal(magnitude_trim(TIES_B, 4 / 9), TIES_B_HAT)
    assert torch.equal(ties(TIES_DST, [(TIES_A_HAT, None), (TIES_B_HAT, None)]), TIES_EXPECTED)
    new, stats = merge_module(TIES_DST, [(TIES_A, None), (TIES_B, None)], "ties", 4 / 9)
    assert torch.equal(new, TIES_EXPECTED)
    # merged = kept entries with the elected sign: Â all 4; B̂ not (1,0), where s = 0
    assert stats == {"entries": 9, "kept_per_source": [4, 4], "merged_per_source": [4, 3],
                     "changed_fraction": 7 / 9}


def test_magnitude_trim_exact_k_with_ties():
    w = T([1.0, -3.0, 3.0, -3.0, 2.0])
    assert torch.equal(magnitude_trim(w, 0.4), T([0.0, -3.0, 3.0, 0.0, 0.0]))
    with pytest.raises(GradPrunerError, match="weight holds NaN"):
        magnitude_trim(T([1.0, math.nan]), 0.5)


def ref_ties(w_dst, sources):
    out = []
    for j, d in enumerate(w_dst.flatten().tolist()):
        vals = [d] + [w.flatten().tolist()[j] for w in sources]
        s = sgn(sum(vals))
        agree = [v for v in vals if v != 0 and sgn(v) == s]
        out.append(d if s == 0 else sum(agree) / len(agree))
    return torch.tensor(out, dtype=torch.float64).view_as(w_dst)


def test_ties_matches_loop_reference_on_random():
    g = torch.Generator().manual_seed(7)
    w_dst = torch.randn(5, 7, generator=g)
    w_dst[0, :3] = 0.0
    srcs = [torch.randn(5, 7, generator=g) for _ in range(3)]
    trimmed = [ref_sparsify(w, w.abs(), 0.3) for w in srcs]
    new, stats = merge_module(w_dst, [(w, None) for w in srcs], "ties", 0.3)
    torch.testing.assert_close(new.double(), ref_ties(w_dst, trimmed), rtol=1e-6, atol=1e-6)
    assert stats["kept_per_source"] == [10, 10, 10]


def test_none_returns_unaliased_copy():
    w_dst = T([[1.0, -2.0], [0.0, 3.0]])
    src = T([[5.0, 5.0], [0.0, 5.0]])
    out = none(w_dst, [(src, None)])
    assert torch.equal(out, w_dst) and out.data_ptr() != w_dst.data_ptr()
    out[0, 0] = 9.0
    assert w_dst[0, 0] == 1.0
    new, stats = merge_module(w_dst, [(src, None)], "none", 0.0)  # density ignored
    assert torch.equal(new, w_dst) and new.data_ptr() != w_dst.data_ptr()
    assert stats == {"entries": 4, "kept_per_source": [3], "merged_per_source": [0],
                     "changed_fraction": 0.0}


def test_laco_two_sources_by_hand():
    w_dst = T([[1.0, 2.0], [3.0, 4.0]])
    a = T([[2.0, 2.0], [0.0, 5.0]])
    b = T([[1.0, -1.0], [3.0, 8.0]])
    # W_dst + (a − W_dst) + (b − W_dst): [[1+1+0, 2+0−3], [3−3+0, 4+1+4]]
    expected = T([[2.0, -1.0], [0.0, 9.0]])
    assert torch.equal(laco(w_dst, [(a, None), (b, None)]), expected)
    assert torch.equal(expected, w_dst + (a - w_dst) + (b - w_dst))
    for density in (0.01, 1.0, 0.0):  # full sources: density is ignored
        new, stats = merge_module(w_dst, [(a, None), (b, T([[1.0, 0.0], [0.0, 0.0]]))], "laco", density)
        assert torch.equal(new, expected)
    assert stats == {"entries": 4, "kept_per_source": [3, 4], "merged_per_source": [3, 4],
                     "changed_fraction": 1.0}


def test_igia_rule_needs_f_src():
    for rule in ("sign_sum", "weighted_average"):
        with pytest.raises(GradPrunerError, match=f"Merge source 0 has no IGIA matrix.*'{rule}'"):
            merge_module(torch.ones(2), [(torch.ones(2), None)], rule, 0.5)


def test_unknown_new_rule_did_you_mean():
    with pytest.raises(GradPrunerError, match="Unknown merge rule 'weighted_avg'.*'weighted_average'"):
        merge_module(torch.ones(2), [], "weighted_avg", 0.2)


# ---------------------------------------------------------------- merge_layers without IGIA factors


def test_merge_layers_laco_without_factors():
    from helpers import make_tiny_model

    model = make_tiny_model("llama")
    layers = model.model.layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = merge_layers(model, {"3": 2, 4: 2}, None, 0.2, "laco")
    assert len(stats) == 7  # q, k, v, o, gate, up, down of layer 2
    for rel, module in layers[2].named_modules():
        if isinstance(module, torch.nn.Linear):
            w = {i: before[f"model.layers.{i}.{rel}.weight"] for i in (2, 3, 4)}
            torch.testing.assert_close(module.weight, w[3] + w[4] - w[2], rtol=1e-6, atol=1e-6)
            assert not torch.equal(module.weight, w[2])
            assert stats[f"model.layers.2.{rel}"]["sources"] == [f"model.layers.{i}.{rel}" for i in (3, 4)]
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith("model.layers.2.") or "norm" in k:
            assert torch.equal(after[k], v), k


def test_merge_layers_rules_without_factors_and_errors():
    from helpers import make_tiny_model

    model = make_tiny_model("llama", num_layers=4)
    q = model.model.layers[1].self_attn.q_proj.weight
    before = q.clone()
    merge_layers(model, {2: 1}, None, 0.2, "none")
    assert torch.equal(q, before)
    merge_layers(model, {2: 1}, None, 0.2, "ties")
    assert not torch.equal(q, before)
    for rule in ("sign_sum", "fisher", "weighted_average"):
        with pytest.raises(GradPrunerError, match=f"merge rule '{rule}' needs the IGIA factors of "
                                                  "`gradpruner score --method igia`"):
            merge_layers(model, {2: 1}, None, 0.2, rule)
    with pytest.raises(GradPrunerError, match="Unknown merge rule 'tie'.*Did you mean 'ties'"):
        merge_layers(model, {2: 1}, None, 0.2, "tie")
