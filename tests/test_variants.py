"""IGIA variants: each against a direct computation on hand-made tensors or a tiny model."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from gradpruner import api
from gradpruner.models.loading import load_model, load_tokenizer
from gradpruner.scoring.methods import Context
from gradpruner.scoring.variants import (
    VARIANTS,
    log_mean,
    rescaled,
    residual_scales,
    saliency,
    type_rank,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


LAYER = {"l0.q": 0, "l0.down": 0, "l1.q": 1, "l1.down": 1, "l2.q": 2, "l2.down": 2}


def test_saliency_is_fisher_times_weight_squared():
    f = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    w = torch.tensor([[3.0, -1.0], [2.0, 7.0]])
    # 1·9 + 2·1 + 0.5·4 + 0·49 = 13
    assert saliency({"m": f}, {"m": w}) == {"m": pytest.approx(13.0)}


def test_log_mean_lets_no_single_module_decide():
    scores = {"l0.q": 1.0, "l0.down": 1e6, "l1.q": 10.0, "l1.down": 10.0, "l2.q": 0.0, "l2.down": 1.0}
    out = log_mean(scores, LAYER, 3)
    assert out[0] == pytest.approx(math.log(1e6) / 2) and out[1] == pytest.approx(math.log(10.0))
    assert out[2] == pytest.approx((math.log(1.0) + math.log(1.0)) / 2)  # 0 counts as the smallest positive (1.0)
    assert sum(scores[n] for n in ("l0.q", "l0.down")) > sum(scores[n] for n in ("l1.q", "l1.down"))
    assert out[1] < out[0]  # still below: log(1e6)/2 = 6.9 > log 10 = 2.3


def test_type_rank_averages_per_type_ranks():
    scores = {"l0.q": 5.0, "l1.q": 1.0, "l2.q": 3.0, "l0.down": 100.0, "l1.down": 300.0, "l2.down": 200.0}
    # q ranks: l1 0, l2 1, l0 2; down ranks: l0 0, l2 1, l1 2
    assert type_rank(scores, LAYER, 3) == [1.0, 1.0, 1.0]
    scores["l0.down"] = 400.0  # down ranks: l2 0, l1 1, l0 2
    assert type_rank(scores, LAYER, 3) == [2.0, 0.5, 0.5]


def test_rescaled():
    assert rescaled([2.0, 3.0, 4.0], [2.0, 0.5, 0.0], -1) == [1.0, 6.0, 0.0]
    assert rescaled([2.0, 3.0], [2.0, 3.0], 1) == [4.0, 9.0]


def test_residual_scales_match_autograd_on_hidden_states(tiny_llama):
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    ids = tok(["the cat sat on the mat", "a dog"], return_tensors="pt", padding=True)
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": ids["input_ids"].clone()}
    stats = residual_scales(model, [batch])
    out = model(**batch, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states  # hs[j] = input of layer j; hs[j + 1] = output of layer j (except the last: normed)
    grads = torch.autograd.grad(out.loss, hs[1:-1])
    m = batch["attention_mask"].bool()
    n_tok = int(m.sum())
    for j, g in enumerate(grads):
        assert stats["grad_sq"][j] == pytest.approx(float(g[m].pow(2).sum()) / n_tok, rel=1e-4)
    for j in range(len(hs) - 1):
        assert stats["input_ms"][j] == pytest.approx(float(hs[j][m].pow(2).mean(-1).sum()) / n_tok, rel=1e-4)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no weight gradients taken


@pytest.mark.parametrize("method", sorted(VARIANTS))
def test_every_variant_scores_from_the_igia_run(method, tiny_llama, qa_file, tmp_path):
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method=method, steps=3, batch_size=4, lr=1e-3,
              calib_examples=8, max_length=64, target=3)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert data["method"] == method and len(data["layer_scores"]) == data["num_layers"] == 8
    igia = data["layer_scores_by_rule"]["igia"]
    stats = data["variant_statistics"]
    if method == "igia_saliency":  # recompute Σ F ⊙ W² from the stored factors and the model's weights
        model = load_model(tiny_llama)
        want = [0.0] * 8
        with safe_open(str(tmp_path / "s" / "igia.safetensors"), "pt") as f:
            for n in data["module_scores"]:
                gb, ga = f.get_tensor(f"{n}.grad_B").double(), f.get_tensor(f"{n}.grad_A").double()
                fisher = (gb @ ga).pow(2).mean(0)  # F: the step-mean of the squared simulated gradient B'A'
                want[data["module_layer"][n]] += float((fisher * model.get_submodule(n).weight.double().pow(2)).sum())
        assert data["layer_scores"] == pytest.approx(want, rel=1e-6)
    elif method == "igia_gradnorm":
        assert data["layer_scores"] == pytest.approx([s / g for s, g in zip(igia, stats["grad_sq"])])
    elif method == "igia_scaled":
        assert data["layer_scores"] == pytest.approx([s * c for s, c in zip(igia, stats["input_ms"])])
    elif method == "igia_greedy":  # its search: tests/test_greedy.py
        assert stats["target"] == 3 and len(stats["greedy_order"]) == 3 and "batches" not in stats
    elif not method.startswith("igia_guarded"):  # the guards: test_guarded_variants_need_and_use_the_target
        assert stats is None
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3, merge=1)
    assert len(plan["drop"]) == 3 and plan["method"] == method


def test_residual_scales_are_taken_before_training(tiny_llama, qa_file, tmp_path):
    """The statistics describe the model as given: the same as measured directly on it."""
    from gradpruner.data.examples import load_examples, tokenize

    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="igia_scaled", steps=3, batch_size=4,
              lr=1e-3, calib_examples=8, max_length=64)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    feats = tokenize(load_examples(data=qa_file, split="train"), tok, max_length=64)
    sums, n_tok = [0.0] * 8, 0  # mean square of each layer's input hidden state, over real tokens
    with torch.no_grad():
        for batch in Context(model, tok, feats, seed=0, calib_examples=8, batch_size=4).batches():
            hs = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
            m = batch["attention_mask"].bool()
            n_tok += int(m.sum())
            for j in range(8):
                sums[j] += float(hs[j][m].double().pow(2).mean(-1).sum())
    assert data["variant_statistics"]["input_ms"] == pytest.approx([v / n_tok for v in sums], rel=1e-4)


def test_guard_lets_igia_choose_only_within_the_pool():
    from gradpruner.scoring.variants import guarded

    igia = [5.0, 1.0, 2.0, 0.5, 4.0, 3.0]
    bi = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3]  # cheapest to remove: 1, 4, 5, then 3
    out = guarded(igia, bi, 3)
    assert out[1] == 1.0 and out[4] == 4.0 and out[5] == 3.0  # in the pool: their IGIA
    assert out[3] == 6.0 + 3 and out[2] == 6.0 + 4 and out[0] == 6.0 + 5  # outside: above all, in guard order
    assert sorted(range(6), key=lambda j: out[j])[:3] == [1, 5, 4]  # layer 3 (lowest IGIA) is guarded


@pytest.mark.parametrize(("prune", "layers", "pool"), [
    (12, 30, 16), (9, 30, 12),  # prune divisible by 3: prune + prune/3
    (4, 30, 6), (13, 30, 18),  # ⌈4/3⌉ = 2, ⌈13/3⌉ = 5; rounding down or to nearest would give 5 and 17
    (5, 30, 7), (1, 30, 2),  # ⌈5/3⌉ = 2, ⌈1/3⌉ = 1; rounding down would give 6 and 1
    (8, 9, 8), (20, 24, 23),  # capped at layers − 1: one layer always stays outside the pool
])
def test_guard_pool_is_prune_plus_a_third_rounded_up(prune, layers, pool):
    from gradpruner.scoring.variants import guard_pool

    assert guard_pool(prune, layers) == pool


def test_removal_loss_is_the_measured_loss_increase(tiny_llama):
    import tempfile
    from pathlib import Path

    from helpers import qa_rows, write_jsonl

    from gradpruner.data.examples import load_examples, tokenize
    from gradpruner.scoring.methods import removal_loss

    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    with tempfile.TemporaryDirectory() as d:
        feats = tokenize(load_examples(data=write_jsonl(Path(d) / "qa.jsonl", qa_rows(16)), split="train"), tok, max_length=64)
    ctx = Context(model, tok, feats, seed=0, calib_examples=8, batch_size=4)
    res = removal_loss(ctx)
    batches = ctx.batches()
    full = model.model.layers
    with torch.no_grad():
        base = sum(float(model(**b, use_cache=False).loss) for b in batches) / len(batches)
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(full) if i != 2])
        without2 = sum(float(model(**b, use_cache=False).loss) for b in batches) / len(batches)
    model.model.layers = full
    assert res["calib_loss"] == pytest.approx(base) and res["layer_scores"][2] == pytest.approx(without2 - base)
    assert len(model.model.layers) == 8  # the model is left whole


@pytest.mark.parametrize("method", ["igia_guarded", "igia_guarded_loss"])
def test_guarded_variants_use_the_target_or_the_plans_default_count(method, tiny_llama, qa_file, tmp_path):
    api.score(str(tiny_llama), tmp_path / "x", data=qa_file, method=method, steps=2, batch_size=4, max_length=64,
              calib_examples=8)
    assert json.loads((tmp_path / "x" / "scores.json").read_text())["variant_statistics"]["target"] == 12
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method=method, steps=3, batch_size=4, lr=1e-3,
              calib_examples=8, max_length=64, target=3)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    guard = data["variant_statistics"]["block_influence" if method == "igia_guarded" else "removal_loss"]
    igia = data["layer_scores_by_rule"]["igia"]
    order = sorted(range(8), key=lambda j: (guard[j], j))  # lowest guard score first
    pool = order[:4]  # 3 + ⌈3/3⌉ = 4 layers
    for j in range(8):  # in the pool its IGIA; outside, above every IGIA score, in guard order
        assert data["layer_scores"][j] == (igia[j] if j in pool else max(igia) + 1.0 + order.index(j))
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3, merge=1)
    assert set(plan["drop"]) <= set(pool)


def test_config_refuses_a_guarded_variant_without_a_layer_count_and_keys_it_by_that_count(tmp_path):
    from gradpruner.errors import GradPrunerError
    from gradpruner.pipeline.config import config_from_dict
    from gradpruner.pipeline.run import Run

    with pytest.raises(GradPrunerError, match="igia_guarded needs plan.prune"):
        config_from_dict({"score": {"method": "igia_guarded"}, "plan": {"prune": None, "target_params": 0.3}})

    def keys(prune, method="igia_guarded"):
        cfg = config_from_dict({"out": str(tmp_path / f"r{prune}{method}"), "score": {"method": method},
                                "plan": {"prune": prune}})
        return Run(cfg, echo=lambda *_: None, isolate=False).keys
    assert keys(9)["score"] != keys(12)["score"]          # the guard's pool depends on it
    assert keys(9, "igia")["score"] == keys(12, "igia")["score"]  # the paper's scores do not


def test_the_registry_says_which_methods_are_variants():
    from gradpruner.scoring.methods import METHODS
    from gradpruner.scoring.variants import READS_MODEL, VARIANTS

    assert {n for n, m in METHODS.items() if m.kind == "variant"} == set(VARIANTS)
    assert READS_MODEL < set(VARIANTS)  # those score --fsdp gives a whole model after the steps
    assert {n for n, m in METHODS.items() if m.kind == "igia"} == {"igia", "igia_norm"}
    assert all(m.fn is not None for m in METHODS.values() if m.kind == "direct")


def test_every_method_function_has_a_catalog_entry():
    """The functions and the torch-free catalog (what ``score --help`` lists) name the same direct methods."""
    from gradpruner.scoring.catalog import CATALOG
    from gradpruner.scoring.methods import FUNCTIONS, METHODS

    assert set(FUNCTIONS) == {n for n, info in CATALOG.items() if info.kind == "direct"}
    assert list(METHODS) == list(CATALOG)
    assert all(METHODS[n].about == info.about and METHODS[n].trains == info.trains for n, info in CATALOG.items())
