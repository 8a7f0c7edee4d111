"""Block granularity: attention and MLP blocks removed in adjacent pairs (models/blocks.py, planning/blocks.py,
the greedy block search in scoring/greedy.py, surgery and streaming of block plans).

The reference here is plain torch: the full model with forward hooks that replace a removed block's output by
zeros (so it adds nothing to the residual stream), and the cross-entropy of the shifted logits; not the
code under test, which drops whole layers from the forward pass and replaces the blocks' forward methods."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradpruner import api
from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.models.blocks import layer_pairs, mlp_side, units, without_blocks
from gradpruner.planning.blocks import block_plan
from gradpruner.planning.plans import plan_summary, validate_plan
from gradpruner.pruning.surgery import move_mlp_blocks, remove_layers
from gradpruner.scoring.greedy import greedy_block_removal
from helpers import make_tiny_model, save_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

N = 8


def zeroed(model, removed):
    """Forward hooks that zero the outputs of the removed blocks (ids: 2·layer attention, 2·layer + 1 MLP)."""
    layers = model.model.layers
    handles = []
    for b in removed:
        layer = layers[b // 2]
        if b % 2 == 0:
            handles.append(layer.self_attn.register_forward_hook(lambda m, i, out: (torch.zeros_like(out[0]),) + out[1:]))
        else:
            handles.append(layer.mlp.register_forward_hook(lambda m, i, out: torch.zeros_like(out)))
    return handles


def reference_logits(model, ids, removed):
    handles = zeroed(model, removed)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def test_mlp_side_knows_llama_and_gemma_sandwich_layers():
    assert mlp_side({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}) == {"mlp", "post_attention_layernorm"}
    gemma = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm"}
    assert mlp_side(gemma) == {"mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    with pytest.raises(GradPrunerError, match="cross_attn"):
        mlp_side({"self_attn", "mlp", "cross_attn"})


def test_layer_pairs_by_hand():
    assert units([0, 1, 2, 3]) == [(0, 1), (1, 2), (2, 3)]
    assert layer_pairs({1, 2}, 4) == [(0, 1), (2, 2), (3, 3)]  # layer 0's MLP and layer 1's attention
    assert layer_pairs({2, 3}, 4) == [(0, 0), (2, 2), (3, 3)]  # layer 1 whole
    assert layer_pairs({1, 2, 5, 6}, 4) == [(0, 1), (2, 3)]
    assert layer_pairs({1, 2, 3, 4, 5, 6}, 4) == [(0, 3)]  # attention of 0, MLP of 3
    for bad in ({1}, {0, 1, 2}, {6, 7, 4, 5, 2, 3, 0, 1}, {0, 3}):
        with pytest.raises(GradPrunerError):
            layer_pairs(bad, 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "phi3", "mistral"])
def test_pruned_block_plan_computes_what_the_full_model_does_without_those_blocks(arch):
    model = make_tiny_model(arch, num_layers=6)
    removed = {3, 4, 7, 8}  # layer 1's MLP + layer 2's attention, layer 3's MLP + layer 4's attention
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    want = reference_logits(model, ids, removed)
    with without_blocks(model, removed), torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, want, atol=1e-5)
    assert len(model.model.layers) == 6 and "forward" not in vars(model.model.layers[1].mlp)  # restored
    pairs = layer_pairs(removed, 6)
    assert pairs == [(0, 0), (1, 2), (3, 4), (5, 5)]
    move_mlp_blocks(model, {"1": 2, "3": 4})
    remove_layers(model, [a for a, _ in pairs])
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert model.config.num_hidden_layers == 4 and torch.allclose(got, want, atol=1e-5)


def test_greedy_block_search_takes_the_cheapest_pair_each_step(tiny_llama, qa_file):
    from gradpruner.data.examples import load_examples, tokenize
    from gradpruner.models.loading import load_model, load_tokenizer
    from gradpruner.scoring.methods import Context

    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama)
    ctx = Context(model, tok, tokenize(load_examples(data=qa_file, split="train"), tok, max_length=64), seed=0,
                  calib_examples=8, batch_size=4)
    batches = ctx.batches()

    def loss(removed):
        handles = zeroed(model, removed)
        try:
            with torch.no_grad():
                total = 0.0
                for b in batches:
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                    total += float(torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100))
            return total / len(batches)
        finally:
            for h in handles:
                h.remove()

    removed, order = set(), []
    for _ in range(2):
        remaining = [b for b in range(2 * N) if b not in removed]
        trial = {(a, b): loss(removed | {a, b}) for a, b in zip(remaining, remaining[1:])}
        best = min(trial, key=lambda u: (trial[u], u))
        removed |= set(best)
        order.append(list(best))
    res = greedy_block_removal(model, batches, list(range(N)), 2)
    assert res["block_order"] == order and res["greedy_unit"] == "block"
    assert res["forward_passes"] == (2 * N - 1) + (2 * N - 3)
    pool = greedy_block_removal(model, batches, [2, 3, 4], 1)
    assert pool["forward_passes"] == 5 and {b // 2 for b in pool["block_order"][0]} <= {2, 3, 4}
    with pytest.raises(GradPrunerError, match="remove 2 block pairs but has only 1 candidate layers"):
        greedy_block_removal(model, batches, [3], 2)
    with pytest.raises(GradPrunerError, match="removes 1 to 7"):
        greedy_block_removal(model, batches, list(range(N)), N)


def test_block_plan_from_an_order_and_its_checks():
    plan = block_plan([[3, 4], [9, 10], [0, 1]], 2, 8, [10] * 8, 100)
    # blocks 3, 4 = layer 1's MLP, layer 2's attention; 9, 10 = layer 4's MLP, layer 5's attention
    assert plan["keep"] == [0, 1, 3, 4, 6, 7] and plan["drop"] == [2, 5] and plan["mlp_from"] == {"1": 2, "4": 5}
    assert plan["params"] == {"total_before": 100, "total_after": 80, "removed_fraction": 0.2}
    assert validate_plan(plan, 8)["mlp_from"] == {"1": 2, "4": 5}
    assert "1 <- 2, 4 <- 5" in plan_summary(plan)
    with pytest.raises(GradPrunerError, match="fewer than the 4"):
        block_plan([[3, 4]], 4, 8, None, None)
    with pytest.raises(GradPrunerError, match="one size"):
        block_plan([[3, 4]], 1, 8, [10] * 7 + [12], None)
    for bad, match in (({"1": 5}, "between 1 and the next kept layer"), ({"2": 3}, "not kept"),
                       ({"1": 0}, "not removed"), ({"1": True}, "not a pair")):
        with pytest.raises(GradPrunerError, match=match):
            validate_plan({**plan, "mlp_from": bad}, 8)
    with pytest.raises(GradPrunerError, match="cannot also merge"):
        validate_plan({**plan, "merge": {"2": 1}}, 8)


@pytest.mark.parametrize("out_of_core", [False, True])
def test_score_plan_prune_end_to_end_and_the_checkpoint_reloads(tiny_llama, qa_file, tmp_path, out_of_core):
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="greedy_loss", greedy_unit="block",
              calib_examples=8, batch_size=4, max_length=64, target=3)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert len(data["block_order"]) == 3 and data["greedy_unit"] == "block"
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3, granularity="block")
    assert len(plan["keep"]) == N - 3 and plan["granularity"] == "block"
    with pytest.raises(GradPrunerError, match="--granularity block"):
        api.plan(tmp_path / "s" / "scores.json", tmp_path / "layer.json", prune=3)
    meta = api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "small", out_of_core=out_of_core)
    assert meta["out_of_core"] is out_of_core
    removed = {b for unit in data["block_order"] for b in unit}
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    ids = torch.randint(0, dense.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path / "small")).eval()
    with torch.no_grad():
        got = small(input_ids=ids).logits
    assert small.config.num_hidden_layers == N - 3
    assert torch.allclose(got, reference_logits(dense, ids, removed), atol=1e-5)


def test_cli_block_search_and_the_run_config_checks(tiny_llama, qa_file, tmp_path, capsys):
    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--method", "greedy_loss",
                 "--greedy-unit", "block", "--prune", "2", "--calib-examples", "4", "--batch-size", "4",
                 "--max-length", "64", "--out", str(tmp_path / "s")]) == 0
    assert main(["plan", "--scores", str(tmp_path / "s" / "scores.json"), "--prune", "2", "--granularity", "block",
                 "--merge", "1", "--out", str(tmp_path / "p.json")]) != 0
    assert "--granularity block takes --prune" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
    from gradpruner.pipeline.config import config_from_dict

    with pytest.raises(GradPrunerError, match="greedy block search"):
        config_from_dict({"score": {"method": "igia_guarded"}, "plan": {"granularity": "block"}})
    with pytest.raises(GradPrunerError, match="only plan.granularity block uses"):
        config_from_dict({"score": {"method": "igia_greedy", "greedy_unit": "block"}})
    with pytest.raises(GradPrunerError, match="merging or healing"):
        config_from_dict({"score": {"method": "igia_greedy", "greedy_unit": "block"},
                          "plan": {"granularity": "block", "merge": 1}})
    cfg = config_from_dict({"score": {"method": "igia_greedy", "greedy_unit": "block"}, "plan": {"granularity": "block"}})
    assert cfg.plan.granularity == "block"


def test_streamed_block_plan_refuses_an_mlp_of_another_shape(tmp_path):
    from gradpruner.pruning.streamed import prune_streaming
    from transformers import AutoConfig

    folder = save_tiny_model_dir(tmp_path / "m", "llama", num_layers=4)
    config = AutoConfig.from_pretrained(str(folder))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    plan = validate_plan(block_plan([[3, 4]], 1, 4, None, None), 4)
    (tmp_path / "out").mkdir()
    with pytest.raises(GradPrunerError, match="differs in shape"):
        prune_streaming(folder, config, plan, tmp_path / "out", None, 0.0, "none", 10**9)


def test_igia_greedy_block_search_plans_within_igias_pool(tiny_llama, qa_file, tmp_path):
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="igia_greedy", greedy_unit="block", steps=2,
              batch_size=4, lr=1e-3, calib_examples=8, max_length=64, target=2, greedy_pool_factor=2.0)
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    stats = data["variant_statistics"]
    igia = data["layer_scores_by_rule"]["igia"]
    pool = sorted(sorted(range(N), key=lambda j: (igia[j], j))[:4])
    assert stats["greedy_candidates"] == pool and "batches" not in stats and "greedy_unit" in stats
    assert {b // 2 for unit in stats["block_order"] for b in unit} <= set(pool)
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=2, granularity="block")
    assert plan["removed_blocks"] == sorted(b for unit in stats["block_order"] for b in unit)
