"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): experts scored and merged per expert."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    MOE_CONFIGS,
    folder_tensors,
    make_tiny_moe,
    make_tiny_tokenizer,
    qa_rows,
    write_jsonl,
)
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from gradpruner import api
from gradpruner.errors import GradPrunerError
from gradpruner.models import experts
from gradpruner.models.architectures import SUPPORTED, find_decoder_layers
from gradpruner.models.loading import save_model
from gradpruner.pruning.merging import merge_layers, merge_module
from gradpruner.pruning.streamed import prune_streaming, stream_problem
from gradpruner.pruning.surgery import remove_layers
from gradpruner.scoring import igia as scoring
from gradpruner.scoring.capture import lora_modules

ARCHS = sorted(MOE_CONFIGS)
PLAN = {"num_layers": 8, "keep": [0, 1, 3, 4, 6], "drop": [2, 5, 7], "merge": {"2": 1, "5": 4, "7": 6}}
PROMPT = torch.tensor([[1, 17, 42, 99, 250, 3, 77, 123, 5, 61, 200, 18]])


@pytest.fixture(scope="module", params=ARCHS)
def moe_run(request, tmp_path_factory):
    """(arch, sharded model folder, scores folder of a 3-step IGIA run on it)."""
    arch, root = request.param, tmp_path_factory.mktemp(request.param)
    model_dir = root / "model"
    make_tiny_moe(arch).save_pretrained(str(model_dir), max_shard_size="200KB")
    make_tiny_tokenizer(model_dir)
    data = write_jsonl(root / "qa.jsonl", qa_rows(16))
    api.score(str(model_dir), root / "scores", data=data, method="igia", steps=3, batch_size=4, lr=1e-3, rank=2)
    return arch, model_dir, root / "scores"


def test_moe_types_are_supported_and_have_layouts():
    assert {"mixtral", "qwen2_moe", "qwen3_moe"} <= set(SUPPORTED) & set(experts.UNITS)
    assert set(MOE_CONFIGS) == {"mixtral", "qwen2_moe", "qwen3_moe"}


@pytest.mark.parametrize("arch", ARCHS)
def test_units_are_the_tensors_save_pretrained_writes(arch, tmp_path):
    model = make_tiny_moe(arch, num_layers=3)
    model.save_pretrained(str(tmp_path))
    saved = folder_tensors(tmp_path)
    assert set(saved) <= experts.checkpoint_names(model)
    prefix, n_units = "model.layers", 0
    for i, params in experts.expert_params(model).items():
        for rel, p in params.items():
            for unit, e, rows in experts.blocks(arch, rel, p.shape):
                assert torch.equal(saved[f"{prefix}.{i}.{unit}.weight"], p.detach()[e, rows]), unit
                n_units += 1
    n_sparse = 2 if arch == "qwen2_moe" else 3  # qwen2_moe's layer 2 is dense (mlp_only_layers)
    assert n_units == n_sparse * 4 * 3  # 4 experts x (gate, up, down)
    down = "block_sparse_moe.experts.1.w2" if arch == "mixtral" else "mlp.experts.1.down_proj"
    assert experts.checkpoint_units(model, saved)[0][f"{down}.weight"] == ("mlp.experts.down_proj", 1, slice(0, 64))


def test_per_expert_factors_match_the_gradient_of_the_fused_weight():
    """peft's stacked LoRA factors, split per expert, are s·B_eᵀ ∂L/∂W_e and s·∂L/∂W_e A_eᵀ (dense LoRA)."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_moe("qwen3_moe", num_layers=1)
    ref = copy.deepcopy(model)
    names = experts.expert_parameter_names(model)
    assert names == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    r, alpha = 2, 4
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"],
                                                  target_parameters=names))
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n and ".experts." in n:  # q_proj's B stays 0: the reference has no q_proj update
            torch.nn.init.normal_(p)
    ids = torch.randint(3, 300, (2, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    counts: dict[str, int] = {}
    mods = lora_modules(peft_model, counts)
    assert counts == {n: 4 for n in names}
    s = alpha / r
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():  # the reference model carries the LoRA update merged into W_e
        for name in names:
            a, b = mods[name]
            A, B = experts.split_factors(a.weight, b.weight, 4)  # [E, r, in], [E, out, r]
            ref_params[name] += s * B @ A
    ref(input_ids=ids, labels=ids).loss.backward()
    for name in names:
        a, b = mods[name]
        A, B = experts.split_factors(a.weight.detach(), b.weight.detach(), 4)
        ga, gb = experts.split_factors(a.weight.grad, b.weight.grad, 4)
        G = ref_params[name].grad  # ∂L/∂W, [E, out, in]
        assert torch.count_nonzero(G) > 0
        torch.testing.assert_close(ga, s * B.transpose(1, 2) @ G, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gb, s * G @ A.transpose(1, 2), rtol=1e-4, atol=1e-7)


def test_per_expert_igia_is_the_dense_formula_for_each_expert():
    g = torch.Generator().manual_seed(0)
    T, E, out, r, inp = 3, 2, 3, 2, 4
    gb, ga = torch.randn(T, E, out, r, generator=g), torch.randn(T, E, r, inp, generator=g)
    want = torch.zeros(E, out, inp)
    for e in range(E):  # Eq. 2 then Eq. 3, entry by entry, for each expert
        for k in range(out):
            for l in range(inp):
                for i in range(T):
                    v = sum(float(gb[i, e, k, q]) * float(ga[i, e, q, l]) for q in range(r))
                    want[e, k, l] += v * v / T
    torch.testing.assert_close(scoring.igia_matrix(gb, ga), want, rtol=1e-5, atol=1e-6)
    sq = scoring.step_sq_norms(gb, ga)  # [T, E]
    assert sq.shape == (T, E)
    # The module score (as capture computes it: per-step sum over experts, mean over steps) is Σ F.
    assert scoring.score_igia(sq.sum(dim=1)) == pytest.approx(float(want.double().sum()), rel=1e-5)


def test_scores_count_every_expert(moe_run):
    arch, model_dir, scores = moe_run
    s = json.loads((scores / "scores.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    params = experts.expert_parameter_names(base)
    assert set(params) <= set(s["module_scores"]) and all(s["module_scores"][n] > 0 for n in params)
    assert not any(".mlp.gate." in n or n.endswith(".mlp.gate") for n in s["module_scores"])  # routers unscored
    with safe_open(str(scores / "igia.safetensors"), "pt") as f:
        for n in params:
            p = base.get_parameter(n)
            assert tuple(f.get_slice(f"{n}.grad_A").get_shape()) == (3, p.shape[0], 2, p.shape[2])
            assert tuple(f.get_slice(f"{n}.grad_B").get_shape()) == (3, p.shape[0], p.shape[1], 2)
            assert torch.count_nonzero(f.get_tensor(f"{n}.grad_A")[0]) == 0  # B = 0 at step 1
    for j in range(8):
        mods = [v for n, v in s["module_scores"].items() if s["module_layer"][n] == j]
        assert s["layer_scores"][j] == pytest.approx(sum(mods), rel=1e-9)
    if arch == "qwen2_moe":
        assert not any(n.startswith("model.layers.2.mlp.experts") for n in s["module_scores"])  # dense layer


def test_in_memory_merge_is_expert_to_expert_and_keeps_routers(moe_run):
    arch, model_dir, scores = moe_run
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = merge_layers(model, {5: 4}, scores / "igia.safetensors", 0.3, "sign_sum")
    after = model.state_dict()
    rel = "mlp.experts.gate_up_proj"
    with safe_open(str(scores / "igia.safetensors"), "pt") as f:
        keys = set(f.keys())
        for unit, e, rows in experts.blocks(arch, rel, before[f"model.layers.4.{rel}"].shape):
            shape = tuple(before[f"model.layers.5.{rel}"][e, rows].shape)
            f_src = scoring.module_igia(f, keys, f"model.layers.5.{rel}", shape, "igia", expert=e, rows=rows)
            want, _ = merge_module(before[f"model.layers.4.{rel}"][e, rows],
                                   [(before[f"model.layers.5.{rel}"][e, rows], f_src)], "sign_sum", 0.3)
            assert torch.equal(after[f"model.layers.4.{rel}"][e, rows], want), unit
            assert stats[f"model.layers.4.{unit}"]["sources"] == [f"model.layers.5.{unit}"]
    assert not torch.equal(after[f"model.layers.4.{rel}"], before[f"model.layers.4.{rel}"])
    assert torch.equal(after["model.layers.4.mlp.gate.weight"], before["model.layers.4.mlp.gate.weight"])
    if arch == "qwen2_moe":
        gate = "model.layers.4.mlp.shared_expert_gate.weight"
        assert torch.equal(after[gate], before[gate]) and "model.layers.4.mlp.shared_expert_gate" not in stats
        assert "model.layers.4.mlp.shared_expert.down_proj" in stats  # the shared expert merges like a dense MLP
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("model.layers.4."))


@pytest.mark.parametrize("rule", ["sign_sum", "fisher", "ties"])
def test_streamed_checkpoint_equals_the_in_memory_one(moe_run, tmp_path, rule):
    arch, model_dir, scores = moe_run
    assert stream_problem(model_dir, AutoConfig.from_pretrained(str(model_dir)), PLAN) is None
    igia = scores / "igia.safetensors"
    ref = api.prune(str(model_dir), dict(PLAN), tmp_path / "ref", igia=igia, merge_rule=rule, density=0.3,
                    out_of_core=False)
    out = api.prune(str(model_dir), dict(PLAN), tmp_path / "out", igia=igia, merge_rule=rule, density=0.3,
                    out_of_core=True)
    a, b = folder_tensors(tmp_path / "ref"), folder_tensors(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ref["merge_stats"] == out["merge_stats"]
    n_experts = sum(1 for k in ref["merge_stats"] if ".experts." in k)
    assert n_experts == (2 if arch == "qwen2_moe" else 3) * 4 * 3  # layer 2 -> 1 is dense -> sparse for qwen2_moe
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert reloaded.config.num_hidden_layers == 5
    with torch.no_grad():
        logits = reloaded(PROMPT).logits
    assert torch.isfinite(logits).all()


def test_fused_checkpoint_streams_like_the_in_memory_path(tmp_path, moe_run):
    """A checkpoint holding the fused 3D tensors (the model's own names) is merged unit by unit too."""
    from safetensors.torch import save_file

    arch, model_dir, scores = moe_run
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    fused = tmp_path / "fused"
    fused.mkdir()
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    stats = prune_streaming(fused, model.config, PLAN, out, scores / "igia.safetensors", 0.3, "sign_sum", 10**9)
    merge_layers(model, PLAN["merge"], scores / "igia.safetensors", 0.3, "sign_sum")
    remove_layers(model, PLAN["keep"])
    got = folder_tensors(out)
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    assert sum(1 for k in stats if ".experts." in k) == (2 if arch == "qwen2_moe" else 3) * 4 * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_generation_and_reload(arch, tmp_path):
    model = make_tiny_moe(arch)
    old = model.config
    remove_layers(model, [1, 2, 5])
    assert model.config.num_hidden_layers == 3
    _, _, layers = find_decoder_layers(model)
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    if arch == "qwen2_moe":  # old layer 2 (dense) is now layer 1
        assert model.config.mlp_only_layers == [1] and model.config.decoder_sparse_step == 1
        assert old.mlp_only_layers == [2]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = model.generate(PROMPT, use_cache=True, **kwargs)
        uncached = model.generate(PROMPT, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)
    save_model(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(reloaded.model.layers[0].mlp).__name__ == type(model.model.layers[0].mlp).__name__
    if arch == "qwen2_moe":
        assert type(reloaded.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, model(PROMPT).logits, atol=1e-5, rtol=0)


def test_unknown_fused_experts_are_refused_naming_what_is_missing():
    import transformers

    if not hasattr(transformers, "OlmoeConfig"):
        pytest.skip("this transformers has no OLMoE")
    config = transformers.OlmoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=16, num_experts=4,
                                      num_experts_per_tok=2, vocab_size=300, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(GradPrunerError, match=r"'olmoe'.*fused 3D.*mlp\.experts\..*layout.*mixtral, qwen2_moe, qwen3_moe"):
        experts.expert_parameter_names(model)
    with pytest.raises(GradPrunerError, match="olmoe"):
        merge_layers(model, {1: 0}, None, 0.2, "none")


def test_lora_dropout_dora_and_saliency_are_refused_for_experts():
    with pytest.raises(GradPrunerError, match="--adapter lora and --lora-dropout 0"):
        experts.check_lora(["model.layers.0.mlp.experts.down_proj"], "dora", 0.0)
    with pytest.raises(GradPrunerError, match="igia_saliency"):
        experts.check_lora(["model.layers.0.mlp.experts.down_proj"], "lora", 0.0, "igia_saliency")
    experts.check_lora([], "dora", 0.1, "igia_saliency")  # dense models: nothing to refuse


def test_default_guarded_method_scores_a_moe_model(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_moe("qwen3_moe", num_layers=4).save_pretrained(str(model_dir))
    make_tiny_tokenizer(model_dir)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    s = api.score(str(model_dir), tmp_path / "s", data=data, method="igia_guarded", steps=2, batch_size=4,
                  rank=2, target=1, calib_examples=4)
    assert len(s["layer_scores"]) == 4 and "model.layers.0.mlp.experts.gate_up_proj" in s["module_scores"]
