"""Hidden-size (kernel) pruning, the paper's Appendix D ablation: math, surgery and the plan."""
import json

import pytest
import torch
from helpers import make_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gradpruner import api
from gradpruner.errors import GradPrunerError
from gradpruner.pruning.width import dim_scores, prune_width, width_plan
from gradpruner.scoring.igia import igia_matrix


def test_dim_scores_are_igia_row_and_column_sums(tiny_scores):
    factors = tiny_scores / "igia.safetensors"
    with safe_open(str(factors), "pt") as f:
        names = sorted({k[:-7] for k in f.keys() if k.endswith(".grad_A")})
        q = next(n for n in names if n.endswith("q_proj"))
        d = f.get_tensor(f"{q}.grad_A").shape[2]  # q_proj reads the residual stream
        expect = torch.zeros(d, dtype=torch.float64)
        for n in names:
            ga, gb = f.get_tensor(f"{n}.grad_A"), f.get_tensor(f"{n}.grad_B")
            F = igia_matrix(gb, ga).double() * ga.shape[0]  # Σ over steps of G²
            if n.endswith(("o_proj", "down_proj")):
                expect += F.sum(dim=1)
            elif ga.shape[2] == d:
                expect += F.sum(dim=0)
    got = torch.tensor(dim_scores(factors, d), dtype=torch.float64)
    assert torch.allclose(got, expect, rtol=1e-4)


def test_width_plan_keeps_the_top_dimensions():
    plan = width_plan([3.0, 1.0, 2.0, 2.0, 0.5], 0.6)
    assert plan == {"hidden_size": 5, "keep_dims": [0, 2, 3], "drop_dims": [1, 4]}
    assert width_plan([3.0, 1.0, 2.0, 2.0, 0.5, 0.1], 0.6, multiple=2)["keep_dims"] == [0, 1, 2, 3]
    assert len(width_plan([1.0] * 12, 0.6, multiple=4)["keep_dims"]) == 8
    with pytest.raises(GradPrunerError):
        width_plan([1.0], 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prune_width_keeping_every_dimension_changes_nothing(arch, tmp_path):
    model = make_tiny_model(arch).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    before = model(ids).logits
    prune_width(model, list(range(model.config.hidden_size)))
    assert torch.allclose(model(ids).logits, before, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prune_width_dropping_dead_dimensions_is_exact(arch, tmp_path):
    """With a model whose stream never uses dropped dims, outputs are unchanged after dropping them."""
    model = make_tiny_model(arch).eval()
    d = model.config.hidden_size
    keep = list(range(0, d, 2))  # a multiple of the 4 heads, as transformers requires
    dropped = sorted(set(range(d)) - set(keep))
    with torch.no_grad():  # make the dropped dims dead: zero in the embedding and in every writer
        model.get_input_embeddings().weight[:, dropped] = 0
        for name, m in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                m.weight[dropped, :] = 0
                if m.bias is not None:
                    m.bias[dropped] = 0
    for m in model.modules():  # RMSNorm's eps is the one term that depends on d; take it out to test exactly
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.0
    n_before = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    out = model(ids, output_hidden_states=True)
    h, before_logits = out.hidden_states[-1][..., sorted(keep)], out.logits
    prune_width(model, sorted(keep))
    logits = model(ids).logits
    # RMSNorm weights are rescaled by sqrt(d/d'), so dead dimensions leave no trace at all
    assert torch.allclose(model(ids, output_hidden_states=True).hidden_states[-1], h, atol=1e-5)
    assert torch.allclose(logits, before_logits, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < n_before
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for m in again.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.0
    assert again.config.hidden_size == len(keep)
    assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_hidden_plan_and_prune_end_to_end(tiny_llama, tiny_scores, tmp_path):
    plan = api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", prune=3, granularity="hidden")
    assert plan["drop"] == [] and plan["granularity"] == "hidden"
    layer_plan = api.plan(tiny_scores / "scores.json", tmp_path / "lp.json", prune=3)
    assert plan["params"]["removed_fraction"] == pytest.approx(layer_plan["params"]["removed_fraction"], abs=0.03)
    api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "p")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert m.config.hidden_size == len(plan["hidden"]["keep_dims"]) and m.config.num_hidden_layers == 8
    assert m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    bad = json.loads((tmp_path / "plan.json").read_text())
    bad["hidden"]["keep_dims"] = [0, 0, 999]
    with pytest.raises(GradPrunerError, match="keep_dims"):
        api.prune(str(tiny_llama), bad, tmp_path / "q")
    assert not (tmp_path / "q").exists()
