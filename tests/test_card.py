"""The model card every saved folder carries: Hub front matter that parses, and what was done."""
import json

import pytest

from gradpruner import api
from gradpruner.finetuning.finetune import finetune
from gradpruner.models.card import base_model_id, front_matter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_base_model_from_alias_hub_id_or_recorded_folder(tmp_path):
    hub = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert base_model_id("smollm2-135m", hub) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("meta-llama/Llama-3.1-8B", hub) == "meta-llama/Llama-3.1-8B"
    folder = tmp_path / "pruned"
    folder.mkdir()
    assert base_model_id(str(folder), hub) is None  # a local model whose origin is not recorded
    (folder / "gradpruner.json").write_text(json.dumps({"base_model": "org/model"}))
    assert base_model_id(str(folder), hub) == "org/model"
    assert base_model_id(str(tmp_path / "missing" / "x"), hub) is None  # a path, not a Hub id


def _card(folder):
    text = (folder / "README.md").read_text()
    return front_matter(text), text


@pytest.mark.parametrize("out_of_core", [False, True])
def test_pruned_folder_has_a_card(tiny_llama, tiny_scores, tmp_path, out_of_core):
    plan = api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", prune=3, merge=0)
    api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "pruned", out_of_core=out_of_core)
    meta, text = _card(tmp_path / "pruned")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"gradpruner", "pruned", "layer-pruning"} <= set(meta["tags"]) and "base_model" not in meta
    assert "3 of 8 decoder layers removed" in text
    named = text.split("layers removed (layers ")[1].split(", counted")[0]  # e.g. "2–4" or "1, 5, 6–7"
    layers = set()
    for part in named.split(", "):
        lo, _, hi = part.partition("–")
        layers |= set(range(int(lo), int(hi or lo) + 1))
    assert layers == set(plan["drop"])


def test_finetuned_pruned_folder_carries_the_whole_history(tiny_llama, tiny_scores, qa_file, tmp_path):
    api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", prune=2, merge=0)
    api.prune(str(tiny_llama), tmp_path / "plan.json", tmp_path / "pruned")
    pruned_meta = json.loads((tmp_path / "pruned" / "gradpruner.json").read_text())
    pruned_meta["base_model"] = "org/tiny"  # as if pruned from a Hub model
    (tmp_path / "pruned" / "gradpruner.json").write_text(json.dumps(pruned_meta))
    finetune(str(tmp_path / "pruned"), tmp_path / "ft", data=qa_file, max_steps=1, batch_size=4, max_length=64)
    meta, text = _card(tmp_path / "ft")
    assert meta["base_model"] == "org/tiny" and {"pruned", "fine-tuned"} <= set(meta["tags"])
    assert "2 of 8 decoder layers removed" in text and "**Fine-tuned**" in text and "1 optimizer steps" in text
    assert (tmp_path / "ft" / "gradpruner.json").is_file()
