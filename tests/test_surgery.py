"""Layer removal on tiny random models of every supported architecture."""
from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import TINY_CONFIGS, make_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BertConfig, BertModel, Qwen2MoeConfig

from gradpruner.errors import GradPrunerError
from gradpruner.models.architectures import (
    SUPPORTED,
    decoder_layer_prefix,
    find_decoder_layers,
    layer_linear_modules,
    linear_module_names,
    subset_config,
)
from gradpruner.models.loading import save_model
from gradpruner.pruning.surgery import remove_layers

KEEP = [1, 4, 5]
NOT_PER_LAYER = {"architectures", "eos_token_id", "bos_token_id", "pad_token_id"}
# Longer than the tiny sliding windows (4), so sliding and full layers see different contexts.
PROMPT = torch.tensor([[1, 17, 42, 99, 250, 3, 77, 123, 5, 61, 200, 18]])


def per_layer_lists(config, n):
    return {k: v for k, v in vars(config).items()
            if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_")
            and k not in NOT_PER_LAYER}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pruned(request):
    """(arch, original state dict, original config, pruned model)."""
    model = make_tiny_model(request.param)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config
    remove_layers(model, KEEP)
    return request.param, state, config, model


def test_every_supported_arch_has_a_tiny_config():
    assert set(TINY_CONFIGS) <= set(SUPPORTED)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3"} <= set(TINY_CONFIGS)


def test_kept_weights_are_identical(pruned):
    _, old_state, _, model = pruned
    prefix = decoder_layer_prefix(model)
    new_state = model.state_dict()
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    expected = {}
    for key, value in old_state.items():
        m = layer_key.match(key)
        if m is None:
            expected[key] = value
        elif int(m.group(1)) in KEEP:
            expected[f"{prefix}.{KEEP.index(int(m.group(1)))}.{m.group(2)}"] = value
    assert set(new_state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(new_state[key], value), key


def test_layer_idx_and_config_are_renumbered(pruned):
    _, _, old, model = pruned
    new = model.config
    assert new is not old and old.num_hidden_layers == 8 and new.num_hidden_layers == len(KEEP)
    _, _, layers = find_decoder_layers(model)
    assert len(layers) == len(KEEP)
    for j, layer in enumerate(layers):
        assert layer.self_attn.layer_idx == j
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == j
    # Every module sees the new config object.
    for module in model.modules():
        if hasattr(module, "config"):
            assert module.config is new
    old_lists = per_layer_lists(old, 8)
    new_lists = per_layer_lists(new, len(KEEP))
    assert set(old_lists) == set(new_lists)
    for name, values in old_lists.items():
        assert list(new_lists[name]) == [values[i] for i in KEEP], name
    if getattr(old, "layer_types", None) is not None:
        assert new.layer_types == [old.layer_types[i] for i in KEEP]
        for j, layer in enumerate(layers):  # each kept attention keeps its kind
            assert getattr(layer.self_attn, "layer_type", new.layer_types[j]) == new.layer_types[j]
    if hasattr(old, "max_window_layers"):  # Qwen: the position rule agrees with the explicit types
        assert new.max_window_layers == sum(1 for i in KEEP if i < old.max_window_layers)
        derived = ["sliding_attention" if new.use_sliding_window and j >= new.max_window_layers
                   else "full_attention" for j in range(len(KEEP))]
        assert derived == new.layer_types
    new.validate()


def test_cached_generation_matches_uncached(pruned):
    _, _, _, model = pruned
    with torch.no_grad():
        assert model(PROMPT).logits.shape == (1, PROMPT.shape[1], 300)
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True, output_logits=True)
        cached = model.generate(PROMPT, use_cache=True, **kwargs)
        uncached = model.generate(PROMPT, use_cache=False, **kwargs)
    assert cached.sequences.shape == (1, PROMPT.shape[1] + 8)
    assert torch.equal(cached.sequences, uncached.sequences)
    # Logits too, so a cache mix-up is caught even where greedy tokens happen to agree.
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


def test_sliding_flag_follows_kept_layers():
    model = make_tiny_model("qwen2")  # layers 0-3 full, 4-7 sliding
    assert model.model.has_sliding_layers
    remove_layers(model, [0, 2, 3])
    assert model.config.layer_types == ["full_attention"] * 3 and model.config.max_window_layers == 3
    assert not model.model.has_sliding_layers
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=True)
    assert out.shape == (1, PROMPT.shape[1] + 4)


def test_saved_model_reloads_without_gradpruner(pruned, tmp_path):
    arch, _, _, model = pruned
    model.config.quantization_config = {"quant_method": "gguf"}  # as GGUF-converted models carry
    try:
        save_model(model, None, tmp_path, extra_files={"gradpruner.json": {"kept_layers": KEEP}})
    finally:
        del model.config.quantization_config
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert saved_config["num_hidden_layers"] == len(KEEP)
    assert json.loads((tmp_path / "gradpruner.json").read_text()) == {"kept_layers": KEEP}

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, model(PROMPT).logits, atol=1e-5, rtol=0)
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)

    keys = set()
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    prefix = re.escape(decoder_layer_prefix(model))
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"^{prefix}\.(\d+)\.", k))}
    assert indices == set(range(len(KEEP)))
    assert len([k for k in keys if re.match(rf"^{prefix}\.", k)]) == \
        len([k for k in model.state_dict() if re.match(rf"^{prefix}\.", k)])

    for m in (model, reloaded):
        tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        assert tied == bool(m.config.tie_word_embeddings), arch


def test_non_decoder_models_are_rejected():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100))
    with pytest.raises(GradPrunerError, match="bert"):
        find_decoder_layers(bert)

    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    with pytest.raises(GradPrunerError, match="NoLayers"):
        find_decoder_layers(NoLayers())


@pytest.mark.parametrize("keep", [[], [3, 1], [1, 1, 2], [0, 8], [-1, 2], [0.5], "12", None])
def test_bad_keep_lists_are_rejected(keep):
    model = make_tiny_model("llama", num_layers=4)
    with pytest.raises(GradPrunerError):
        remove_layers(model, keep)
    assert model.config.num_hidden_layers == 4  # nothing was changed


def test_layer_linear_modules_llama():
    model = make_tiny_model("llama", num_layers=3)
    per_layer = layer_linear_modules(model)
    assert sorted(per_layer) == [0, 1, 2]
    expected = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    modules = dict(model.named_modules())
    for i, linears in per_layer.items():
        assert set(linears) == expected
        for name, module in linears.items():
            assert modules[f"model.layers.{i}.{name}"] is module
    names = linear_module_names(model)
    assert len(names) == 21 and names[0].startswith("model.layers.0.") and names[-1].startswith("model.layers.2.")
    assert all(isinstance(modules[n], torch.nn.Linear) for n in names)


def test_subset_config_rules_without_layer_types():
    # A Gemma 3 config from a pattern: every 3rd layer full. Kept layers [0, 2, 3] are
    # sliding, full, sliding: no longer the pattern, so the pattern is dropped and types are explicit.
    config = TINY_CONFIGS["gemma3_text"](6)
    del config.layer_types
    config.sliding_window_pattern = 3
    new = subset_config(config, [0, 2, 3])
    assert new.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert "sliding_window_pattern" not in new.to_dict()
    # Qwen MoE: sparse every 2nd layer (1, 3, 5) plus layer 3 forced dense. Keeping [1, 2, 3, 5]
    # must keep sparse, dense, dense, sparse at the new positions.
    moe = Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=4)
    new = subset_config(moe, [1, 2, 3, 5])
    assert new.decoder_sparse_step == 1 and new.mlp_only_layers == [1, 2]
