"""Greedy removal by measured loss (scoring/greedy.py): greedy_loss and igia_greedy on the tiny Llama.

The reference computations here use plain torch: the decoder-layer list swapped by hand and the
cross-entropy of the shifted logits on the completion tokens, not the code under test."""
import json

import pytest
import torch

from gradpruner import api
from gradpruner.data.examples import load_examples, tokenize
from gradpruner.errors import GradPrunerError
from gradpruner.models.loading import load_model, load_tokenizer
from gradpruner.scoring.greedy import greedy_removal, greedy_scores, pool_size
from gradpruner.scoring.methods import METHODS, Context, block_influence, greedy_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

N = 8  # layers of the tiny Llama


@pytest.fixture(scope="module")
def features(tiny_llama, qa_file):
    return tokenize(load_examples(data=qa_file, split="train"), load_tokenizer(tiny_llama), max_length=64)


def make_ctx(tiny_llama, features, **kw) -> Context:
    model = load_model(tiny_llama)
    return Context(model, load_tokenizer(tiny_llama), features, seed=0, calib_examples=8, batch_size=4, **kw)


def plain_loss(model, batches, keep) -> float:
    """Mean over batches of the next-token cross-entropy on the completion tokens, layers ``keep`` only."""
    full = model.model.layers
    model.model.layers = torch.nn.ModuleList([full[i] for i in keep])
    try:
        total = 0.0
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                total += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100))
    finally:
        model.model.layers = full
    return total / len(batches)


def brute_force_greedy(model, batches, candidates, steps):
    removed, losses = [], []
    for _ in range(steps):
        trial = {j: plain_loss(model, batches, [i for i in range(N) if i != j and i not in removed])
                 for j in candidates if j not in removed}
        best = min(trial, key=lambda j: (trial[j], j))
        removed.append(best)
        losses.append(trial[best])
    return removed, losses


def identity_model(ctx, identities=(3,)):
    """The tiny Llama with the layers ``identities`` made exact identities (o_proj and down_proj zero, so
    they add nothing to the residual stream), the rest fitted to the calibration batches so that removing
    any other layer costs loss (a random model has layers whose removal helps)."""
    model, batches = ctx.model, ctx.batches()
    layers = model.model.layers
    for j in identities:
        for w in (layers[j].self_attn.o_proj.weight, layers[j].mlp.down_proj.weight):
            with torch.no_grad():
                w.zero_()
            w.requires_grad_(False)
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(40):
        for b in batches:
            opt.zero_grad()
            model(**b, use_cache=False).loss.backward()
            opt.step()
    model.eval()
    return batches


def test_an_identity_layer_is_removed_first(tiny_llama, features):
    ctx = make_ctx(tiny_llama, features, target=2)
    batches = identity_model(ctx)
    base = plain_loss(ctx.model, batches, list(range(N)))
    singles = {j: plain_loss(ctx.model, batches, [i for i in range(N) if i != j]) for j in range(N)}
    assert singles[3] == base and all(singles[j] > base for j in range(N) if j != 3)  # the premise
    res = greedy_loss(ctx)
    assert res["greedy_order"][0] == 3 and res["greedy_losses"][0] == pytest.approx(base, abs=1e-6)
    assert res["layer_scores"][3] == 1.0 and min(res["layer_scores"]) == 1.0


def test_equal_losses_go_to_the_lower_guide_score(tiny_llama, features):
    ctx = make_ctx(tiny_llama, features)
    batches = identity_model(ctx, identities=(3, 5))  # removing either (or both) changes nothing at all
    assert greedy_removal(ctx.model, batches, list(range(N)), 2)["greedy_order"] == [3, 5]  # no guide: lower index
    igia = [1.0] * N
    igia[5] = 0.5  # IGIA ranks layer 5 less important
    res = greedy_removal(ctx.model, batches, list(range(N)), 2, igia)
    assert res["greedy_order"] == [5, 3] and res["greedy_losses"][0] == res["greedy_losses"][1]


def test_greedy_order_is_the_brute_force_order(tiny_llama, features):
    ctx = make_ctx(tiny_llama, features, target=3)
    res = greedy_loss(ctx)
    order, losses = brute_force_greedy(ctx.model, ctx.batches(), range(N), 3)
    assert res["greedy_order"] == order
    assert res["greedy_losses"] == pytest.approx(losses, rel=1e-5)
    assert res["forward_passes"] == 8 + 7 + 6 and res["greedy_candidates"] == list(range(N))
    assert res["seconds"] > 0 and res["greedy_pool"] == "all"
    assert len(ctx.model.model.layers) == N  # the model is left whole


def test_block_influence_pool_is_respected_and_counted(tiny_llama, features):
    ctx = make_ctx(tiny_llama, features, target=2, options={"greedy_pool": "block_influence",
                                                            "greedy_pool_factor": 1.5})
    bi = block_influence(ctx)["layer_scores"]
    pool = sorted(sorted(range(N), key=lambda j: (bi[j], j))[:3])  # ⌈1.5 · 2⌉ = 3 candidates
    res = greedy_loss(ctx)
    assert res["greedy_candidates"] == pool and set(res["greedy_order"]) <= set(pool)
    order, _ = brute_force_greedy(ctx.model, ctx.batches(), pool, 2)
    assert res["greedy_order"] == order
    assert res["forward_passes"] == 1 + 3 + 2  # block influence's pass, then the pool shrinking by one
    outside = [j for j in range(N) if j not in pool]  # never measured: above every candidate, in BI order
    assert min(res["layer_scores"][j] for j in outside) > max(res["layer_scores"][j] for j in pool)
    assert sorted(outside, key=lambda j: res["layer_scores"][j]) == sorted(outside, key=lambda j: (bi[j], j))


def test_scores_rank_the_greedy_order_then_the_last_losses():
    scores = greedy_scores(6, [4, 1], {0: 2.0, 1: 1.0, 2: 3.0, 4: 0.5, 5: 2.5}, [0.1, 0.2, 0.3, 0.0, 0.4, 0.5])
    assert scores == [3.0, 2.0, 5.0, 6.0, 1.0, 4.0]  # 4, 1 removed; 0, 5, 2 by last loss; 3 never measured


def test_plan_drops_exactly_the_greedy_set(tiny_llama, qa_file, tmp_path):
    res = api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="greedy_loss", calib_examples=8,
                    batch_size=4, max_length=64, target=3)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert data["method"] == "greedy_loss" and data["greedy_order"] == res["greedy_order"]
    assert len(data["greedy_losses"]) == 3 and data["forward_passes"] == 21 and data["seconds"] > 0
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3)
    assert plan["drop"] == sorted(data["greedy_order"])
    plan2 = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan2.json", prune=2)
    assert plan2["drop"] == sorted(data["greedy_order"][:2])  # a smaller count: a prefix of the order


def test_cli_block_influence_pool(tiny_llama, qa_file, tmp_path):
    from gradpruner.cli import main

    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--method", "greedy_loss",
                 "--greedy-pool", "block_influence", "--greedy-pool-factor", "1.5", "--prune", "2",
                 "--calib-examples", "4", "--batch-size", "4", "--max-length", "64", "--out", str(tmp_path / "s")]) == 0
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    bi = data["block_influence"]
    assert data["greedy_candidates"] == sorted(sorted(range(N), key=lambda j: (bi[j], j))[:3])
    assert data["forward_passes"] == 1 + 3 + 2


def test_igia_greedy_searches_among_the_lowest_igia_layers(tiny_llama, qa_file, tmp_path):
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="igia_greedy", steps=2, batch_size=4, lr=1e-3,
              calib_examples=8, max_length=64, target=3, greedy_pool_factor=5 / 3)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    st, igia = data["variant_statistics"], data["layer_scores_by_rule"]["igia"]
    pool = sorted(sorted(range(N), key=lambda j: (igia[j], j))[:5])  # ⌈5/3 · 3⌉ = 5
    assert st["greedy_candidates"] == pool and set(st["greedy_order"]) <= set(pool) and "batches" not in st
    assert st["forward_passes"] == 5 + 4 + 3 and st["target"] == 3 and st["seconds"] > 0
    # the search ran on the model as given (the LoRA steps left no trace): the plain-torch order
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    feats = tokenize(load_examples(data=qa_file, split="train"), tok, max_length=64)
    batches = Context(model, tok, feats, seed=0, calib_examples=8, batch_size=4).batches()
    order, losses = brute_force_greedy(model, batches, pool, 3)
    assert st["greedy_order"] == order and st["greedy_losses"] == pytest.approx(losses, rel=1e-5)
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3)
    assert plan["drop"] == sorted(st["greedy_order"])


def test_greedy_needs_a_valid_pool_and_count(tiny_llama, features, tmp_path):
    with pytest.raises(GradPrunerError, match="block_influence"):
        greedy_loss(make_ctx(tiny_llama, features, target=2, options={"greedy_pool": "igia"}))
    with pytest.raises(GradPrunerError, match="--prune N"):
        greedy_loss(make_ctx(tiny_llama, features))
    with pytest.raises(GradPrunerError, match="1 to 7"):
        greedy_loss(make_ctx(tiny_llama, features, target=8))
    with pytest.raises(GradPrunerError, match="greedy-pool-factor"):
        greedy_removal(make_ctx(tiny_llama, features).model, [], [0, 1], 3)


def test_run_config_keys_greedy_by_the_layer_count(tmp_path):
    from gradpruner.pipeline.config import config_from_dict
    from gradpruner.pipeline.run import Run

    with pytest.raises(GradPrunerError, match="greedy_loss needs plan.prune"):
        config_from_dict({"score": {"method": "greedy_loss"}, "plan": {"prune": None, "target_params": 0.3}})
    with pytest.raises(GradPrunerError, match="score.greedy_pool"):
        config_from_dict({"score": {"method": "greedy_loss", "greedy_pool": "igia"}})

    def key(prune, method="greedy_loss", **score):
        cfg = config_from_dict({"out": str(tmp_path / "r"), "score": {"method": method, **score},
                                "plan": {"prune": prune}})
        return Run(cfg, echo=lambda *_: None, isolate=False).keys["score"]
    assert key(9) != key(12) and key(9, "igia_greedy") != key(12, "igia_greedy")
    assert key(12) != key(12, greedy_pool="block_influence") and key(12) != key(12, greedy_pool_factor=1.5)
    assert key(9, "igia") == key(12, "igia") == key(12, "igia", greedy_pool="all")  # defaults: keys as before


def test_registry():
    assert METHODS["greedy_loss"].kind == "direct" and not METHODS["greedy_loss"].trains
    assert METHODS["igia_greedy"].kind == "variant" and METHODS["igia_greedy"].factors
    assert pool_size(3, 8, 5 / 3) == 5 and pool_size(4, 30, 4 / 3) == 6  # 5/3 · 3 is 5.000…01 in floats
    assert pool_size(12, 30, 2.0) == 24 and pool_size(12, 16, 2.0) == 16 and pool_size(3, 8, 0.5) == 3
