"""Layer-selection methods: each against a direct computation on a tiny model."""
import json

import pytest
import torch
from helpers import qa_rows

from gradpruner import api
from gradpruner.data.examples import PadCollator
from gradpruner.errors import GradPrunerError
from gradpruner.models.loading import load_model, load_tokenizer
from gradpruner.scoring.methods import (
    METHODS,
    Context,
    block_influence,
    laco,
    last_n,
    magnitude,
    random_order,
    taylor,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture()
def ctx(tiny_llama):
    from gradpruner.data.examples import load_examples, tokenize

    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    import tempfile
    from pathlib import Path

    from helpers import write_jsonl

    with tempfile.TemporaryDirectory() as d:
        examples = load_examples(data=write_jsonl(Path(d) / "qa.jsonl", qa_rows(24)), split="train")
    feats = tokenize(examples, tok, max_length=64)
    return Context(model, tok, feats, seed=0, calib_examples=12, batch_size=4, steps=3, lr=1e-3)


def _layers(model):
    return model.model.layers


def test_block_influence_is_one_minus_cosine_from_hidden_states(ctx):
    got = block_influence(ctx)["layer_scores"]
    # by hand: hidden_states[j] is the input of layer j; the last layer's output is taken before the final norm
    num, den = [0.0] * len(got), 0.0
    with torch.no_grad():
        for b in ctx.batches():
            outs = []
            h = _layers(ctx.model)[-1].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
            hs = ctx.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                           use_cache=False).hidden_states
            h.remove()
            states = list(hs[:-1]) + [outs[0]]
            m = b["attention_mask"].float()
            den += float(m.sum())
            for j in range(len(got)):
                cos = torch.nn.functional.cosine_similarity(states[j], states[j + 1], dim=-1)
                num[j] += float((cos * m).sum())
    expect = [1 - n / den for n in num]
    assert got == pytest.approx(expect, rel=1e-5, abs=1e-6)


def test_taylor_is_abs_weight_times_gradient(ctx):
    got = taylor(ctx)["layer_scores"]
    model = ctx.model
    model.zero_grad()
    batches = ctx.batches()
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    expect = [float(sum((p * p.grad).abs().sum() for p in layer.parameters())) for layer in _layers(model)]
    assert got == pytest.approx(expect, rel=1e-5)


def test_magnitude_last_n_random(ctx):
    n = len(_layers(ctx.model))
    mags = magnitude(ctx)["layer_scores"]
    assert mags[2] == pytest.approx(float(sum(p.abs().sum() for p in _layers(ctx.model)[2].parameters())))
    assert last_n(ctx)["layer_scores"] == [float(n - j) for j in range(n)]
    r1, r2 = random_order(ctx)["layer_scores"], random_order(ctx)["layer_scores"]
    assert r1 == r2 and sorted(r1) == [float(i) for i in range(1, n + 1)]
    ctx.seed = 1
    assert random_order(ctx)["layer_scores"] != r1


def test_laco_collapses_rear_layers_into_their_base(ctx):
    before = {j: {k: v.clone() for k, v in layer.state_dict().items()} for j, layer in enumerate(_layers(ctx.model))}
    ctx.target, ctx.options = 3, {"laco_group": 4, "laco_threshold": -1.0}  # accept every collapse
    res = laco(ctx)
    n = len(_layers(ctx.model))
    assert res["laco"]["groups"] == {str(n - 4): [n - 3, n - 2, n - 1]} and res["laco"]["shortfall"] == 0
    scores = res["layer_scores"]
    assert sorted(range(n), key=lambda j: scores[j])[:3] == [n - 3, n - 2, n - 1]
    base = n - 4  # θ_base += Σ (θ_k − θ_base) on the linear modules
    w = _layers(ctx.model)[base].self_attn.q_proj.weight
    key = "self_attn.q_proj.weight"
    expect = before[base][key] + sum(before[k][key] - before[base][key] for k in (n - 3, n - 2, n - 1))
    assert torch.allclose(w, expect, atol=1e-6)
    # threshold 1.01 can never be met: the most similar collapse tried is forced to reach the target
    ctx2 = Context(load_model(ctx.model.name_or_path), ctx.tokenizer, ctx.features, calib_examples=4, target=2,
                   options={"laco_threshold": 1.01})
    res2 = laco(ctx2)["laco"]
    best = max(res2["trials"], key=lambda t: t["similarity"])
    assert not any(t["accepted"] for t in res2["trials"]) and len(res2["trials"]) == n - 4
    assert res2["forced"] == [str(best["base"])] and res2["groups"] == {str(best["base"]): best["sources"][:2]}
    assert res2["shortfall"] == 0


def test_laco_needs_a_target(ctx):
    with pytest.raises(GradPrunerError, match="--prune N"):
        laco(ctx)


@pytest.mark.parametrize("method", ["block_influence", "taylor", "removal_taylor", "magnitude", "last_n", "random", "full_grad", "igia_norm"])
def test_score_writes_the_same_scores_file_for_every_method(method, tiny_llama, qa_file, tmp_path):
    res = api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method=method, steps=3, batch_size=4, lr=1e-3,
                    calib_examples=8, max_length=64)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert data["method"] == method and len(data["layer_scores"]) == data["num_layers"] == 8
    assert (tmp_path / "s" / "layer_scores.png").is_file()
    assert (tmp_path / "s" / "igia.safetensors").is_file() == METHODS[method].factors
    if method == "igia_norm":
        assert data["layer_scores"] == data["layer_scores_by_rule"]["igia_norm"]
    if method == "full_grad":
        assert len(data["step_layer_sq_norms"]) == 3 and res["steps"] == 3
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3)
    order = sorted(range(8), key=lambda j: (data["layer_scores"][j], j))
    assert plan["drop"] == sorted(order[:3]) and plan["method"] == method


def test_unknown_method_and_merge_without_factors(tiny_llama, qa_file, tmp_path):
    with pytest.raises(GradPrunerError, match="block_influence"):
        api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="block_influense")
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="magnitude")
    api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3, merge=1)
    with pytest.raises(GradPrunerError, match="ties, laco or none"):
        api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "p")
    meta = api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "p", merge_rule="ties")
    assert meta["merge_stats"] and not (tmp_path / "p" / "model.safetensors").is_symlink()


def test_dora_adapter_scores(tiny_llama, qa_file, tmp_path):
    res = api.score(str(tiny_llama), tmp_path / "s", data=qa_file, steps=3, batch_size=4, lr=1e-3, adapter="dora")
    assert res["adapter"] == "dora" and res["informative_steps"] >= 1 and sum(res["layer_scores"]) > 0


def test_cli_score_method_then_sensitivity(tiny_llama, qa_file, tmp_path, capsys):
    from gradpruner.cli import main

    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--method", "last_n",
                 "--out", str(tmp_path / "n")]) == 0
    assert "method last_n" in capsys.readouterr().out
    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--method", "lastn",
                 "--out", str(tmp_path / "m")]) == 2
    assert "last_n" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--steps", "4", "--batch-size", "4",
                 "--lr", "1e-3", "--out", str(tmp_path / "i")]) == 0
    assert main(["sensitivity", str(tmp_path / "i" / "scores.json"), "--k", "3", "--out", str(tmp_path / "sens")]) == 0
    curve = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert curve["steps"] == [1, 2, 3, 4] and curve["overlap"][-1] == 1.0
    assert (tmp_path / "sens" / "sensitivity.png").is_file()
    # a baseline's scores have no per-step record: one clear error
    assert main(["sensitivity", str(tmp_path / "n" / "scores.json"), "--k", "3"]) == 2
    assert "step_layer_sq_norms" in capsys.readouterr().err


def test_removal_taylor_is_gradient_dot_layer_contribution(ctx):
    from gradpruner.scoring.methods import removal_taylor

    got = removal_taylor(ctx)["layer_scores"]
    model, layers = ctx.model, _layers(ctx.model)
    num, den = [0.0] * len(layers), 0.0
    for b in ctx.batches():  # by hand: hidden_states[j] is layer j's input; retain grads on every output
        outs = {}
        hs = [layer.register_forward_hook(lambda m, a, o, j=j: outs.__setitem__(j, (a[0], o[0] if isinstance(o, tuple) else o)))
              for j, layer in enumerate(layers)]
        model.zero_grad()
        loss = model(**b).loss
        for h in hs:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[j][1] for j in range(len(layers))])
        m = b["attention_mask"].float()
        den += float(m.sum())
        for j in range(len(layers)):
            inp, out = outs[j]
            num[j] += float(((grads[j] * (out - inp)).sum(-1).abs() * m).sum())
    assert got == pytest.approx([n / den for n in num], rel=1e-4)


def test_full_grad_one_step_is_the_squared_dense_gradient(ctx):
    from gradpruner.scoring.methods import full_grad

    feats = ctx.features[:4]
    batch = PadCollator(ctx.tokenizer.pad_token_id)(feats)
    model = ctx.model
    model.zero_grad()
    model(**batch).loss.backward()  # by hand: the gradient of the one batch, before any optimizer step
    expect = [float(sum(m.weight.grad.double().pow(2).sum() for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                    layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                    layer.mlp.down_proj))) for layer in _layers(model)]
    model.zero_grad()
    ctx.features, ctx.steps, ctx.batch_size = feats, 1, 4
    got = full_grad(ctx)
    assert got["layer_scores"] == pytest.approx(expect, rel=1e-4) and got["steps"] == 1


def test_only_layers_runs_the_subset_and_puts_the_layers_back():
    import copy

    from helpers import make_tiny_model

    from gradpruner.models.architectures import find_decoder_layers, only_layers
    from gradpruner.pruning.surgery import remove_layers

    model = make_tiny_model("llama")
    ids = torch.tensor([[3, 7, 11, 2, 5]])
    full = list(find_decoder_layers(model)[2])
    pruned = remove_layers(copy.deepcopy(model), [0, 2, 5])
    with only_layers(model, [0, 2, 5]), torch.no_grad():
        skipped = model(ids, use_cache=False).logits
    with torch.no_grad():
        assert torch.allclose(skipped, pruned(ids, use_cache=False).logits, atol=1e-6)
    assert list(find_decoder_layers(model)[2]) == full  # restored, same modules
    try:
        with only_layers(model, [1]):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert list(find_decoder_layers(model)[2]) == full
