"""Bad input: one clear sentence naming the input and what to do, exit code 2, nothing half-written."""
import json
from pathlib import Path

import pytest

from gradpruner.cli import main


def _run(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "gradpruner: error: " in err
    return err[err.index("gradpruner: error: "):]  # progress bars may precede it


def _no_leftovers(folder: Path, name: str):
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}.tmp")]


@pytest.fixture()
def plan_file(tmp_path):
    def make(**plan):
        base = {"num_layers": 8, "keep": [0, 1, 2, 3, 4, 5], "drop": [6, 7], "merge": {}}
        base.update(plan)
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(base))
        return path
    return make


def score_args(model, data, out, *extra):
    return ["score", "--model", model, "--data", data, "--steps", "2", "--batch-size", "2", "--out", out, *extra]


def test_missing_model_path(capsys, tmp_path, qa_file):
    err = _run(capsys, *score_args(tmp_path / "nope", qa_file, tmp_path / "o"))
    assert "nope" in err and "does not exist" in err
    _no_leftovers(tmp_path, "o")


def test_not_a_causal_lm(capsys, tmp_path, qa_file):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "bert")
    err = _run(capsys, *score_args(tmp_path / "bert", qa_file, tmp_path / "o"))
    assert "bert" in err
    _no_leftovers(tmp_path, "o")


def test_unknown_task(capsys, tiny_llama, tmp_path):
    err = _run(capsys, "score", "--model", tiny_llama, "--task", "arc_eazy", "--out", tmp_path / "o")
    assert "arc_eazy" in err and "arc_easy" in err


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    ("", "empty"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\nnot json\n', "line 3"),
])
def test_bad_data_files(capsys, tiny_llama, tmp_path, content, needle):
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_text(content)
    err = _run(capsys, *score_args(tiny_llama, data, tmp_path / "o"))
    assert "d.jsonl" in err and needle in err
    if content and "line 3" in needle:
        assert "line 2" in err  # every bad line is reported, not just the first
    _no_leftovers(tmp_path, "o")


def test_steps_below_two_says_why(capsys, tiny_llama, qa_file, tmp_path):
    err = _run(capsys, "score", "--model", tiny_llama, "--data", qa_file, "--steps", "1", "--out", tmp_path / "o")
    assert "first" in err and "no signal" in err


def test_non_finite_loss_stops_with_the_step_and_a_hint(capsys, tiny_llama, qa_file, tmp_path):
    err = _run(capsys, *score_args(tiny_llama, qa_file, tmp_path / "o", "--lr", "1e30", "--steps", "6"))
    assert "Non-finite" in err and "step" in err and "--lr" in err
    _no_leftovers(tmp_path, "o")


@pytest.mark.parametrize("flags,needle", [(["--prune", "8"], "at least one layer"), (["--prune", "-1"], "prune"),
                                          (["--prune", "2", "--merge", "3"], "merge")])
def test_bad_plan_flags(capsys, tiny_scores, tmp_path, flags, needle):
    err = _run(capsys, "plan", "--scores", tiny_scores / "scores.json", *flags, "--out", tmp_path / "p.json")
    assert needle in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("plan,needle", [
    ({"keep": [0, 1, 2, 3, 4, 9], "drop": [6, 7]}, "9"),
    ({"keep": [0, 1, 2, 3, 4, 4], "drop": [5, 6, 7]}, "more than once"),
    ({"merge": {"6": 7}}, "7"),
    ({"num_layers": 30, "keep": list(range(20)), "drop": list(range(20, 30))}, "30"),
])
def test_inconsistent_plans(capsys, tiny_llama, tiny_scores, plan_file, tmp_path, plan, needle):
    err = _run(capsys, "prune", "--model", tiny_llama, "--plan", plan_file(**plan), "--igia",
               tiny_scores / "igia.safetensors", "--out", tmp_path / "out")
    assert needle in err.lower()
    _no_leftovers(tmp_path, "out")


def test_igia_missing_a_merged_module(capsys, tiny_llama, tmp_path, plan_file):
    import torch
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.grad_A": torch.zeros(2, 8, 64)}, str(tmp_path / "igia.safetensors"))
    err = _run(capsys, "prune", "--model", tiny_llama, "--plan", plan_file(merge={"6": 5}), "--igia",
               tmp_path / "igia.safetensors", "--out", tmp_path / "out")
    assert "igia.safetensors" in err and "6" in err
    _no_leftovers(tmp_path, "out")


def test_igia_from_another_model(capsys, tmp_path, plan_file, tiny_scores, qa_file):
    import transformers
    from helpers import save_tiny_model_dir

    other = save_tiny_model_dir(tmp_path / "wide", "llama")
    cfg = transformers.AutoConfig.from_pretrained(other)
    cfg.intermediate_size = 96
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    err = _run(capsys, "prune", "--model", other, "--plan", plan_file(merge={"6": 5}), "--igia",
               tiny_scores / "igia.safetensors", "--out", tmp_path / "out")
    assert "score this model again" in err
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("density", ["0", "1.5", "-0.2"])
def test_density_outside_range(capsys, tiny_llama, tiny_scores, plan_file, tmp_path, density):
    err = _run(capsys, "prune", "--model", tiny_llama, "--plan", plan_file(merge={"6": 5}), "--igia",
               tiny_scores / "igia.safetensors", "--density", density, "--out", tmp_path / "out")
    assert "density" in err
    _no_leftovers(tmp_path, "out")


def test_unknown_merge_rule_suggests(capsys, tiny_llama, tiny_scores, plan_file, tmp_path):
    err = _run(capsys, "prune", "--model", tiny_llama, "--plan", plan_file(), "--merge-rule", "sign_sun",
               "--out", tmp_path / "out")
    assert "sign_sum" in err


def test_output_exists_needs_overwrite_and_input_is_never_the_output(capsys, tiny_llama, plan_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = _run(capsys, "prune", "--model", tiny_llama, "--plan", plan_file(), "--out", tmp_path / "out")
    assert "--overwrite" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    err = _run(capsys, "prune", "--model", tiny_llama, "--plan", plan_file(), "--out", tiny_llama, "--overwrite")
    assert "input" in err and (tiny_llama / "config.json").exists()


def test_overwrite_replaces_the_output_whole(capsys, tiny_llama, plan_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    assert main(["prune", "--model", str(tiny_llama), "--plan", str(plan_file()), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_debug_flag_shows_the_traceback(capsys, tmp_path, qa_file):
    assert main(["--debug", *score_args(str(tmp_path / "nope"), str(qa_file), str(tmp_path / "o"))]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_input_model_folder_is_never_modified(tiny_llama, tiny_scores, plan_file, tmp_path):
    import hashlib

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    before = digest(tiny_llama)
    assert main(["prune", "--model", str(tiny_llama), "--plan", str(plan_file(merge={"6": 5})), "--igia",
                 str(tiny_scores / "igia.safetensors"), "--out", str(tmp_path / "out")]) == 0
    assert digest(tiny_llama) == before


def test_pickled_weights_are_refused_unless_allowed(capsys, tiny_llama, plan_file, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pick = tmp_path / "pickled"
    pick.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pick / f.name)
    torch.save(load_file(str(tiny_llama / "model.safetensors")), pick / "pytorch_model.bin")
    err = _run(capsys, "prune", "--model", pick, "--plan", plan_file(), "--out", tmp_path / "out")
    assert "pickled" in err and "--allow-pickle" in err
    _no_leftovers(tmp_path, "out")
    assert main(["prune", "--model", str(pick), "--plan", str(plan_file()), "--out", str(tmp_path / "out"), "--allow-pickle"]) == 0


def test_hub_id_without_network_says_so(capsys, qa_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _run(capsys, *score_args("SomeOrg/some-model-that-is-not-cached", qa_file, tmp_path / "o"))
    assert "SomeOrg/some-model-that-is-not-cached" in err and "Hub id" in err
    _no_leftovers(tmp_path, "o")


def test_missing_gguf_file(capsys, qa_file, tmp_path):
    err = _run(capsys, *score_args(tmp_path / "m.gguf", qa_file, tmp_path / "o"))
    assert "m.gguf" in err and "does not exist" in err


def test_alias_without_its_package_names_the_install_command(monkeypatch):
    import importlib.metadata

    from gradpruner.errors import GradPrunerError
    from gradpruner.models import loading as models

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(GradPrunerError, match="pip install"):
        models.resolve_model("gemma3-270m")
