"""IGIA math against the paper's formulas on hand-made tensors."""
import pytest
import torch

from gradpruner.errors import GradPrunerError
from gradpruner.scoring import igia as scoring


def _factors(steps=5, out=7, r=3, inp=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, out, r, generator=g), torch.randn(steps, r, inp, generator=g)


def test_trace_identity_equals_materialised_norm():
    gb, ga = _factors()
    got = scoring.step_sq_norms(gb, ga)
    want = torch.stack([((gb[i].double() @ ga[i].double()) ** 2).sum() for i in range(gb.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_trace_identity_single_step_shape():
    gb, ga = _factors(steps=1)
    assert scoring.step_sq_norms(gb[0], ga[0]).shape == ()


def test_igia_matrix_is_mean_of_squared_simulated_gradients():
    gb, ga = _factors(steps=4, out=3, r=2, inp=5)
    want = torch.zeros(3, 5)
    for i in range(4):  # Eq. 2 then Eq. 3, entry by entry
        for k in range(3):
            for l in range(5):
                g = sum(float(gb[i, k, q]) * float(ga[i, q, l]) for q in range(2))
                want[k, l] += g * g / 4
    torch.testing.assert_close(scoring.igia_matrix(gb, ga), want, rtol=1e-5, atol=1e-6)


def test_layer_score_is_sum_of_igia_entries_over_modules():
    mods = {f"model.layers.{j}.{m}": _factors(steps=3, seed=10 * j + k) for j in range(2) for k, m in enumerate(["q", "down"])}
    norms = {n: scoring.step_sq_norms(*f) for n, f in mods.items()}
    layer_of = {n: int(n.split(".")[2]) for n in mods}
    got = scoring.layer_scores(scoring.module_scores(norms, "igia"), layer_of, 2)
    for j in range(2):  # Eq. 4: Σ_modules Σ_entries F_W, with F_W the step-mean of (B'A')² (Eqs. 2–3)
        want = sum(float((gb.double() @ ga.double()).pow(2).mean(0).sum()) for n, (gb, ga) in mods.items()
                   if layer_of[n] == j)
        assert got[j] == pytest.approx(want, rel=1e-5)


def test_norm_rule_is_unsquared_norm_summed_over_steps():
    gb, ga = _factors(steps=3)
    want = sum(float(torch.linalg.matrix_norm(gb[i].double() @ ga[i].double())) for i in range(3))
    assert scoring.score_igia_norm(scoring.step_sq_norms(gb, ga)) == pytest.approx(want, rel=1e-10)


def test_first_step_with_zero_B_gradient_of_A_is_uninformative():
    gb, ga = _factors(steps=3)
    ga[0] = 0  # at step 1 B = 0, so grad(A) = 0
    norms = {"model.layers.0.q": scoring.step_sq_norms(gb, ga)}
    assert float(norms["model.layers.0.q"][0]) == 0.0
    assert scoring.informative_steps(norms) == 2


def test_unknown_rule_suggests_a_close_name():
    with pytest.raises(GradPrunerError, match="igia_norm"):
        scoring.module_scores({"a": torch.ones(2)}, "igia_nrom")
