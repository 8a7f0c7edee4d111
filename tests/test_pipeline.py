"""score → plan → prune on tiny random models: the file contracts, the math end to end, the CLI."""
import json
import subprocess
import sys

import pytest
import torch
from helpers import save_tiny_model_dir
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gradpruner import api
from gradpruner.cli import main
from gradpruner.models import architectures


def _factors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_score_writes_the_contracted_files(tiny_scores, tiny_llama):
    s = json.loads((tiny_scores / "scores.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    names = architectures.linear_module_names(base)
    assert (s["steps"], s["informative_steps"], s["rank"], s["num_layers"]) == (4, 3, 8, 8)
    assert len(s["layer_scores"]) == 8 and set(s["module_scores"]) == set(names)
    fac = _factors(tiny_scores / "igia.safetensors")
    assert set(fac) == {f"{n}.{g}" for n in names for g in ("grad_A", "grad_B")}
    mods = dict(base.named_modules())
    for n in names:
        assert fac[f"{n}.grad_A"].shape == (4, 8, mods[n].in_features)
        assert fac[f"{n}.grad_B"].shape == (4, mods[n].out_features, 8)
        assert torch.count_nonzero(fac[f"{n}.grad_A"][0]) == 0  # B = 0 at step 1
    assert (tiny_scores / "layer_scores.png").stat().st_size > 0


def test_layer_scores_match_the_paper_formula_on_the_stored_factors(tiny_scores):
    s = json.loads((tiny_scores / "scores.json").read_text())
    fac = _factors(tiny_scores / "igia.safetensors")
    want = [0.0] * 8
    for name in s["module_scores"]:
        gb, ga = fac[f"{name}.grad_B"].double(), fac[f"{name}.grad_A"].double()
        f_w = sum((gb[i] @ ga[i]) ** 2 for i in range(gb.shape[0])) / gb.shape[0]  # Eq. 2–3, materialised
        want[s["module_layer"][name]] += float(f_w.sum())  # Eq. 4
    assert s["layer_scores"] == pytest.approx(want, rel=1e-6)


def test_capture_once_per_optimizer_step_after_accumulation(tiny_llama, qa_file, tmp_path):
    one = api.score(str(tiny_llama), tmp_path / "a", data=qa_file, steps=3, batch_size=4, lr=1e-3)
    acc = api.score(str(tiny_llama), tmp_path / "b", data=qa_file, steps=3, batch_size=4, grad_accum=2, lr=1e-3)
    assert _factors(tmp_path / "b" / "igia.safetensors")["model.layers.0.mlp.up_proj.grad_A"].shape[0] == 3
    # same examples per optimizer step, so the accumulated gradient is the full-batch gradient
    assert acc["layer_scores"] == pytest.approx(one["layer_scores"], rel=2e-3)


def test_callback_works_inside_a_users_trainer(tiny_llama, qa_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from gradpruner import IGIACallback
    from gradpruner.data.examples import PadCollator, load_jsonl, tokenize
    from gradpruner.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    feats = tokenize(load_jsonl(qa_file), tok)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=5, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=PadCollator(tok.pad_token_id),
                      callbacks=[IGIACallback(tmp_path / "igia", steps=3)])
    trainer.train()
    assert trainer.state.global_step == 5  # capture stops after 3 steps, training goes on
    s = json.loads((tmp_path / "igia" / "scores.json").read_text())
    assert s["steps"] == 3 and len(s["module_scores"]) == 3 * 8 and len(s["losses"]) == 3
    assert _factors(tmp_path / "igia" / "igia.safetensors")["model.layers.2.self_attn.q_proj.grad_B"].shape == (3, 64, 4)


def test_prune_merges_by_the_sign_rule_and_keeps_other_layers_bit_identical(tiny_scores, tiny_llama, tmp_path):
    plan = api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", prune=3, merge=2)
    meta = api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "out")
    old = load_file(str(tiny_llama / "model.safetensors"))
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    targets = {}
    for s, t in plan["merge"].items():
        targets.setdefault(t, []).append(int(s))
    assert {int(k.split(".")[2]) for k in new if ".layers." in k} == set(range(5))
    for k_new, k_old in enumerate(plan["keep"]):
        for key in [k for k in old if k.startswith(f"model.layers.{k_old}.")]:
            a, b = old[key], new[key.replace(f"layers.{k_old}.", f"layers.{k_new}.")]
            if k_old not in targets or "norm" in key:
                assert torch.equal(a, b), key
                continue
            changed = a != b
            delta = b - a
            # every change is a sum of same-signed source entries, so the sign never flips
            assert torch.all(torch.sign(delta[changed]) == torch.sign(a[changed])), key
            src_sum = sum(old[key.replace(f"layers.{k_old}.", f"layers.{s}.")] for s in targets[k_old])
            if len(targets[k_old]) == 1:
                torch.testing.assert_close(delta[changed], src_sum[changed])
            assert changed.sum() <= 0.2 * a.numel() * len(targets[k_old]) + 1
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    gp = json.loads((tmp_path / "out" / "gradpruner.json").read_text())
    assert cfg["num_hidden_layers"] == 5 and gp["plan"]["keep"] == plan["keep"]
    assert gp["density"] == 0.2 and gp["merge_rule"] == "sign_sum" and gp["source"] == str(tiny_llama.resolve())
    assert meta["merge_stats"]


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[1, 70, 71, 72]])
a = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
b = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
assert torch.equal(a, b), (a, b)
assert not any(k.startswith("gradpruner") for k in sys.modules)
print(m.config.num_hidden_layers)
"""


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
def test_pruned_checkpoint_loads_and_generates_with_plain_transformers(arch, qa_file, tmp_path):
    src = save_tiny_model_dir(tmp_path / arch, arch)
    api.score(str(src), tmp_path / "s", data=qa_file, steps=3, batch_size=4, lr=1e-3)
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=3, merge=1)
    api.prune(str(src), tmp_path / "plan.json", tmp_path / "out", merge_rule="fisher")
    res = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("5")
    old_cfg = json.loads((src / "config.json").read_text())
    new_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if old_cfg.get("layer_types"):
        assert new_cfg["layer_types"] == [old_cfg["layer_types"][i] for i in plan["keep"]]


def test_cli_end_to_end(tiny_llama, qa_file, tmp_path, capsys):
    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--steps", "3", "--batch-size", "4",
                 "--out", str(tmp_path / "s")]) == 0
    assert "informative" in capsys.readouterr().out
    assert main(["plan", "--scores", str(tmp_path / "s" / "scores.json"), "--target-params", "0.2", "--merge", "1",
                 "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "params" in out.lower() or "parameters" in out.lower()
    assert main(["prune", "--model", str(tiny_llama), "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "pruned")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["params"]["removed_fraction"] >= 0.2
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(plan["keep"])


def test_a_hand_written_plan_is_accepted(tiny_llama, tiny_scores, tmp_path):
    plan = {"num_layers": 8, "keep": [0, 1, 2, 4, 5, 7], "drop": [3, 6], "merge": {"6": 5}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "out", igia=tiny_scores / "igia.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_training_that_ends_early_keeps_the_captured_steps(tiny_llama, qa_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from gradpruner import IGIACallback
    from gradpruner.data.examples import PadCollator, load_jsonl, tokenize
    from gradpruner.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["o_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=tokenize(load_jsonl(qa_file), tok),
            data_collator=PadCollator(tok.pad_token_id), callbacks=[IGIACallback(tmp_path / "s", steps=10)]).train()
    fac = _factors(tmp_path / "s" / "igia.safetensors")
    assert fac["model.layers.0.self_attn.o_proj.grad_A"].shape == (3, 2, 64)
    assert json.loads((tmp_path / "s" / "scores.json").read_text())["steps"] == 3
    assert not list((tmp_path / "s").glob(".*partial"))


def test_plan_by_the_authors_norm_rule(tiny_scores, tmp_path):
    s = json.loads((tiny_scores / "scores.json").read_text())
    plan = api.plan(tiny_scores / "scores.json", tmp_path / "p.json", prune=2, from_method="igia_norm")
    by_norm = sorted(range(8), key=lambda j: (s["layer_scores_by_rule"]["igia_norm"][j], j))[:2]
    assert plan["drop"] == sorted(by_norm) and plan["score_rule"] == "igia_norm"
