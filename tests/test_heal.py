"""The heal stage (ReplaceMe's linear fold across each cut): the closed form against a direct least-squares
solve, exactness when the removed layers are a linear map, the rules on a tiny Llama, the API, CLI and run."""
import copy
import json

import numpy as np
import pytest
import torch
import yaml

from gradpruner import api
from gradpruner.cli import main
from gradpruner.data.examples import load_jsonl, tokenize
from gradpruner.errors import GradPrunerError
from gradpruner.healing.config import HealConfig
from gradpruner.healing.heal import heal_model, make_batches, split_features
from gradpruner.healing.rules import (
    Cut,
    find_cuts,
    fold_into,
    normal_equations,
    row_weights,
    solve_fold,
    token_mask,
)
from gradpruner.models.loading import load_model, load_tokenizer
from gradpruner.pipeline.config import load_config
from gradpruner.pipeline.run import Run, run
from gradpruner.pruning.surgery import remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

PLAN = {"num_layers": 8, "keep": [0, 1, 2, 4, 7], "drop": [3, 5, 6]}  # cuts [3] after 2 and [5, 6] after 4


@pytest.fixture(scope="module")
def tiny_pruned(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("heal") / "pruned"
    api.prune(str(tiny_llama), PLAN, out)
    return out


def _state(folder):
    return {k: v.clone() for k, v in load_model(folder).state_dict().items()}


# --- the maths, on hand-made tensors --------------------------------------------------------------

def test_cuts_are_the_runs_of_removed_layers():
    assert find_cuts([0, 1, 2, 4, 7], 8) == [Cut((3,), 2, 2), Cut((5, 6), 4, 3)]
    assert find_cuts([2, 3, 5], 7) == [Cut((0, 1), None, None), Cut((4,), 3, 1), Cut((6,), 5, 2)]
    assert find_cuts(list(range(4)), 4) == []


def test_closed_form_is_least_squares():
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(200, 6)), rng.normal(size=(200, 6))
    plain = solve_fold(*normal_equations(torch.tensor(a1), torch.tensor(a2), torch.ones(200, dtype=torch.float64)), 0.0)
    np.testing.assert_allclose(plain.numpy(), np.linalg.lstsq(a1, a2, rcond=None)[0], atol=1e-10)

    # ridge: the same as least squares on A₁ stacked over √λ·I (and A₂ over zeros), λ = α·trace(A₁ᵀA₁)/d
    alpha = 0.5
    lam = alpha * np.trace(a1.T @ a1) / 6
    stacked = np.linalg.lstsq(np.vstack([a1, np.sqrt(lam) * np.eye(6)]), np.vstack([a2, np.zeros((6, 6))]), rcond=None)[0]
    ridge = solve_fold(*normal_equations(torch.tensor(a1), torch.tensor(a2), torch.ones(200, dtype=torch.float64)), alpha)
    np.testing.assert_allclose(ridge.numpy(), stacked, atol=1e-10)


def test_cosine_objective_weights_each_row_by_the_inverse_target_norm():
    rng = np.random.default_rng(1)
    a1, a2 = rng.normal(size=(100, 5)), rng.normal(size=(100, 5))
    target = rng.normal(size=(100, 5)) * rng.uniform(0.1, 50, size=(100, 1))  # a few huge rows, like a sink
    w_np = 1 / np.linalg.norm(target, axis=1)
    expected = np.linalg.lstsq(a1 * w_np[:, None], a2 * w_np[:, None], rcond=None)[0]
    w = row_weights(torch.tensor(target), "cosine")
    np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-12)
    got = solve_fold(*normal_equations(torch.tensor(a1), torch.tensor(a2), w), 0.0)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    assert torch.equal(row_weights(torch.tensor(target), "l2"), torch.ones(100, dtype=torch.float64))


def test_token_mask_leaves_out_padding_and_optionally_the_first_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert token_mask(mask, "all").tolist() == [[True, True, True, False], [True, True, False, False]]
    assert token_mask(mask, "skip_first").tolist() == [[False, True, True, False], [False, True, False, False]]


def test_fold_is_exact_when_the_target_is_a_linear_map_of_the_mlp_output():
    torch.manual_seed(0)
    down = torch.nn.Linear(10, 6, bias=True).double()
    x = torch.randn(300, 10, dtype=torch.float64)
    m = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        a1 = down(x)
        t = solve_fold(*normal_equations(a1, a1 @ m, torch.ones(300, dtype=torch.float64)), 0.0)
    torch.testing.assert_close(t, m, atol=1e-9, rtol=0)
    shapes = (down.weight.shape, down.bias.shape)
    fold_into(down, t)
    assert (down.weight.shape, down.bias.shape) == shapes
    with torch.no_grad():
        torch.testing.assert_close(down(x), a1 @ m, atol=1e-9, rtol=0)


# --- on a tiny Llama ------------------------------------------------------------------------------

def _batches(tiny_llama, qa_file, calib=30, held=10):
    tok = load_tokenizer(tiny_llama)
    fit, heldout = split_features(tokenize(load_jsonl(qa_file), tok, max_length=64), calib, held)
    return make_batches(fit, tok.pad_token_id, 8, "cpu"), make_batches(heldout, tok.pad_token_id, 8, "cpu")


def test_fold_recovers_a_linear_replaceable_layer_in_a_model(tiny_llama, qa_file):
    """Dense: layer 3 does nothing (zero o_proj and down_proj) and layer 2's MLP output is A₁M. Pruned: layer 3
    removed, layer 2's MLP output A₁. Healing must find T = M, i.e. give back the dense down_proj exactly."""
    torch.manual_seed(0)
    pruned = load_model(tiny_llama)
    dense = copy.deepcopy(pruned)
    layers = dense.model.layers
    d = layers[2].mlp.down_proj.weight.shape[0]
    m = torch.eye(d) + 0.2 * torch.randn(d, d) / d ** 0.5
    with torch.no_grad():
        layers[2].mlp.down_proj.weight.copy_(m.T @ layers[2].mlp.down_proj.weight)
        layers[3].self_attn.o_proj.weight.zero_()
        layers[3].mlp.down_proj.weight.zero_()
    keep = [0, 1, 2, 4, 5, 6, 7]
    remove_layers(pruned, keep)
    fit, held = _batches(tiny_llama, qa_file)
    rec = heal_model(dense, pruned, keep, fit, held, HealConfig(rule="lstsq", alpha=0.0))
    cut = rec["cuts"][0]
    assert cut["removed"] == [3] and cut["status"] == "healed" and cut["error_before"] > 1e-3
    assert cut["error_after"] < 1e-5
    torch.testing.assert_close(pruned.model.layers[2].mlp.down_proj.weight, layers[2].mlp.down_proj.weight,
                               atol=1e-4, rtol=1e-4)
    assert abs(rec["loss"]["after"] - rec["loss"]["dense"]) < 1e-4


def test_lstsq_keeps_parameters_and_shapes_and_lowers_the_error(tiny_llama, tiny_pruned, qa_file, tmp_path):
    res = api.heal(str(tiny_llama), tiny_pruned, tmp_path / "healed", PLAN, data=qa_file, rule="lstsq",
                   calib_examples=30, heldout_examples=10, max_length=64)
    before, after = _state(tiny_pruned), _state(tmp_path / "healed")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    assert [c["status"] for c in res["cuts"]] == ["healed", "healed"]
    assert all(c["error_after"] < c["error_before"] for c in res["cuts"])
    written = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert written["cuts"] == res["cuts"] and written["fit_examples"] == 30 and written["heldout_examples"] == 10
    assert (tmp_path / "healed" / "gradpruner.json").is_file()  # the prune record travels with the checkpoint


def test_none_is_the_identity(tiny_llama, tiny_pruned, qa_file):
    pruned = load_model(tiny_pruned)
    res = heal_model(load_model(tiny_llama), pruned, PLAN["keep"], *_batches(tiny_llama, qa_file), HealConfig())
    before, after = _state(tiny_pruned), pruned.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {c["status"] for c in res["cuts"]} == {"unchanged"}
    assert all(c["error_before"] == c["error_after"] for c in res["cuts"])
    assert res["loss"]["before"] == res["loss"]["after"]


def test_a_cut_at_layer_0_is_skipped_and_recorded(tiny_llama, qa_file, tmp_path):
    plan = {"num_layers": 8, "keep": [2, 3, 4, 6, 7], "drop": [0, 1, 5]}
    api.prune(str(tiny_llama), plan, tmp_path / "pruned")
    res = api.heal(str(tiny_llama), tmp_path / "pruned", tmp_path / "healed", plan, data=qa_file, rule="lstsq",
                   calib_examples=30, heldout_examples=10, max_length=64)
    first, second = res["cuts"]
    assert first["removed"] == [0, 1] and first["status"] == "skipped" and "no kept layer before" in first["reason"]
    assert first["after_layer"] is None and first["pruned_layer"] is None
    assert first["error_before"] == pytest.approx(first["error_after"])  # nothing before it changed
    assert second["removed"] == [5] and second["status"] == "healed" and second["pruned_layer"] == 2
    before, after = _state(tmp_path / "pruned"), _state(tmp_path / "healed")
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == ["model.layers.2.mlp.down_proj.weight"]


@pytest.mark.parametrize("settings", [{"target": "hidden", "train": "fold", "objective": "cosine"},
                                      {"target": "logits", "train": "down_proj", "tokens": "skip_first"},
                                      {"init": "identity", "lr": 1e-3}])
def test_trained_rule(tiny_llama, tiny_pruned, qa_file, tmp_path, settings):
    res = api.heal(str(tiny_llama), tiny_pruned, tmp_path / "healed", PLAN, data=qa_file, rule="trained", steps=3,
                   calib_examples=30, heldout_examples=10, max_length=64, **settings)
    assert res["train_loss"]["steps"] == 3 and np.isfinite(res["train_loss"]["last"])
    before, after = _state(tiny_pruned), _state(tmp_path / "healed")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    if settings.get("init") != "identity":
        assert all(c["error_after"] < c["error_before"] for c in res["cuts"])


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma3_text"])
def test_other_architectures_heal_or_are_refused(arch, qa_file, tmp_path):
    from helpers import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / arch, arch)
    api.prune(str(model), PLAN, tmp_path / "pruned")
    settings = {"data": qa_file, "rule": "lstsq", "calib_examples": 30, "heldout_examples": 10, "max_length": 64}
    if arch == "gemma3_text":  # a norm after the MLP: no linear map folds into down_proj
        with pytest.raises(GradPrunerError, match="cannot be healed"):
            api.heal(str(model), tmp_path / "pruned", tmp_path / "healed", PLAN, **settings)
        assert not (tmp_path / "healed").exists()
        return
    res = api.heal(str(model), tmp_path / "pruned", tmp_path / "healed", PLAN, **settings)
    assert all(c["error_after"] < c["error_before"] for c in res["cuts"])


# --- errors -----------------------------------------------------------------------------------------

def test_unknown_rule_is_one_sentence_and_writes_nothing(tiny_llama, tiny_pruned, qa_file, tmp_path, capsys):
    out = tmp_path / "healed"
    rc = main(["heal", "--model", str(tiny_llama), "--pruned", str(tiny_pruned), "--plan", _plan_file(tmp_path),
               "--data", str(qa_file), "--rule", "lstsqq", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Unknown heal rule 'lstsqq'" in err[0] and "Did you mean 'lstsq'" in err[0]
    assert not out.exists()
    rc = main(["prune", "--model", str(tiny_llama), "--plan", _plan_file(tmp_path), "--heal", "trainde",
               "--data", str(qa_file), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Did you mean 'trained'" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".healed*"))


def test_heal_without_a_rule_is_refused_and_writes_nothing(tiny_llama, tiny_pruned, qa_file, tmp_path, capsys):
    out = tmp_path / "healed"
    rc = main(["heal", "--model", str(tiny_llama), "--pruned", str(tiny_pruned), "--plan", _plan_file(tmp_path),
               "--data", str(qa_file), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--rule lstsq" in err[0] and "--rule trained" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".healed*"))
    for rule in ({}, {"rule": "none"}):  # the API alike, by default or asked for rule none
        with pytest.raises(GradPrunerError, match="pass --rule lstsq .* or --rule trained"):
            api.heal(str(tiny_llama), tiny_pruned, out, PLAN, data=qa_file, **rule)
        assert not out.exists()


def _plan_file(tmp_path, plan=PLAN) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_plan_must_match_the_models(tiny_llama, tiny_pruned, qa_file, tmp_path):
    other = {"num_layers": 8, "keep": [0, 1, 2, 3, 7], "drop": [4, 5, 6]}
    with pytest.raises(GradPrunerError, match=r"was made by a plan keeping layers \[0, 1, 2, 4, 7\]"):
        api.heal(str(tiny_llama), tiny_pruned, tmp_path / "a", other, data=qa_file, rule="lstsq")
    fewer = {"num_layers": 8, "keep": [0, 1, 2, 7], "drop": [3, 4, 5, 6]}
    with pytest.raises(GradPrunerError, match="keeps 4 layers but the pruned model"):
        api.heal(str(tiny_llama), tiny_pruned, tmp_path / "b", fewer, data=qa_file, rule="lstsq")
    with pytest.raises(GradPrunerError, match="made for a model with 9 layers"):
        api.heal(str(tiny_llama), tiny_pruned, tmp_path / "c", {**PLAN, "num_layers": 9, "keep": PLAN["keep"] + [8]},
                 data=qa_file, rule="lstsq")
    with pytest.raises(GradPrunerError, match="--objective 'cos' is not known") as exc:
        api.heal(str(tiny_llama), tiny_pruned, tmp_path / "d", PLAN, data=qa_file, rule="lstsq", objective="cos", steps=0)
    assert "--steps 0 must be a whole number" in str(exc.value)
    with pytest.raises(GradPrunerError, match="did you mean 'alpha'"):
        api.heal(str(tiny_llama), tiny_pruned, tmp_path / "e", PLAN, data=qa_file, alpah=1.0)
    assert not any((tmp_path / n).exists() for n in "abcde")


# --- CLI ----------------------------------------------------------------------------------------------

def test_cli_heal_and_prune_with_heal(tiny_llama, tiny_pruned, qa_file, tmp_path, capsys):
    plan = _plan_file(tmp_path)
    small = ["--calib-examples", "30", "--heldout-examples", "10", "--max-length", "64"]
    assert main(["heal", "--model", str(tiny_llama), "--pruned", str(tiny_pruned), "--plan", plan, "--data",
                 str(qa_file), "--rule", "lstsq", "--tokens", "skip_first", *small, "--out", str(tmp_path / "h")]) == 0
    assert "hidden-state error" in capsys.readouterr().out
    model = load_model(tmp_path / "h")
    assert model.config.num_hidden_layers == 5
    rec = json.loads((tmp_path / "h" / "heal.json").read_text())
    assert rec["rule"] == "lstsq" and rec["settings"]["tokens"] == "skip_first" and len(rec["cuts"]) == 2

    assert main(["prune", "--model", str(tiny_llama), "--plan", plan, "--heal", "lstsq", "--data", str(qa_file),
                 "--out", str(tmp_path / "ph")]) == 0
    one = json.loads((tmp_path / "ph" / "heal.json").read_text())
    assert one["settings"] == {**vars(HealConfig()), "rule": "lstsq"}  # the heal defaults, one definition
    assert json.loads((tmp_path / "ph" / "gradpruner.json").read_text())["plan"]["keep"] == PLAN["keep"]
    assert not list(tmp_path.glob(".ph*"))  # the unhealed checkpoint is not kept
    load_model(tmp_path / "ph")


# --- the run --------------------------------------------------------------------------------------------

def test_run_keys_heal_only_when_a_rule_is_set(tmp_path):
    base = Run(load_config(None, [f"out={tmp_path / 'a'}"]), echo=lambda *a: None).keys
    same = Run(load_config(None, [f"out={tmp_path / 'b'}", "heal.rule=none", "heal.alpha=0.5"]), echo=lambda *a: None).keys
    healed = Run(load_config(None, [f"out={tmp_path / 'c'}", "heal.rule=lstsq"]), echo=lambda *a: None).keys
    assert same == base and "heal" not in base  # rule none: no stage, every key as before
    assert {k for k in base if healed[k] != base[k]} == {"pruned_ft", "eval_pruned", "eval_pruned_ft"}
    other = Run(load_config(None, [f"out={tmp_path / 'd'}", "heal.rule=lstsq", "heal.objective=cosine"]),
                echo=lambda *a: None).keys
    assert other["heal"] != healed["heal"] and other["prune"] == healed["prune"]


def test_run_config_checks_the_heal_section():
    with pytest.raises(GradPrunerError, match="Did you mean 'lstsq'"):
        load_config(None, ["heal.rule=lstsqq"])
    with pytest.raises(GradPrunerError, match="heal.tokens 'first' is not known"):
        load_config(None, ["heal.rule=lstsq", "heal.tokens=first"])
    with pytest.raises(GradPrunerError, match="plan.granularity hidden removes none"):
        load_config(None, ["heal.rule=lstsq", "plan.granularity=hidden", "score.method=igia"])


def test_run_with_heal_stage(tiny_llama, tmp_path):
    cfg = {"model": str(tiny_llama), "task": "arc_easy", "out": str(tmp_path / "run"),
           "score": {"method": "magnitude"}, "plan": {"prune": 3},
           "heal": {"rule": "lstsq", "calib_examples": 16, "heldout_examples": 4, "max_length": 64},
           "finetune": {"dense_baseline": False, "max_steps": 1, "batch_size": 4, "max_length": 64, "limit": 8},
           "eval": {"limit": 4, "batch_size": 4, "zero_shot_dense": False}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log: list[str] = []
    report = run(load_config(path), echo=log.append, isolate=False)
    ran = [line.split("→ ")[1] for line in log if "→ " in line]
    assert ran == ["score", "plan", "prune", "heal", "pruned_ft", "eval_pruned", "eval_pruned_ft"]
    d = tmp_path / "run"
    assert (d / "healed" / "heal.json").is_file()
    assert json.loads((d / "eval" / "pruned.json").read_text())["model"].endswith("healed")
    assert "pruned + healed, no fine-tune" in report.read_text()
    log.clear()
    run(load_config(path, ["heal.rule=none"]), echo=log.append, isolate=False)
    assert [line.split("→ ")[1] for line in log if "→ " in line] == ["pruned_ft", "eval_pruned", "eval_pruned_ft"]
