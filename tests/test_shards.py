"""Out-of-core pruning (gradpruner.pruning.streamed) writes the checkpoint the in-memory path writes."""
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    folder_tensors,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_model_dir,
)
from transformers import AutoConfig, AutoModelForCausalLM

from gradpruner import api
from gradpruner.errors import GradPrunerError
from gradpruner.models.loading import tensor_files
from gradpruner.pruning.streamed import parse_size, prune_streaming, stream_problem

PLAN = {"num_layers": 8, "keep": [0, 1, 3, 4, 6], "drop": [2, 5, 7], "merge": {"2": 1, "5": 4, "7": 6}}


def _sharded(path: Path, arch: str = "llama", dtype=torch.float32, shard: str = "20KB") -> Path:
    model = make_tiny_model(arch).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(path), max_shard_size=shard)
    make_tiny_tokenizer(path)
    return path


def _in_memory_and_streamed(tmp_path, model_dir, rule, igia=None, plan=PLAN, shard=10_000):
    ref = tmp_path / "ref"
    meta = api.prune(str(model_dir), dict(plan), ref, igia=igia, merge_rule=rule, density=0.3, out_of_core=False)
    assert meta["out_of_core"] is False
    out = tmp_path / "stream"
    out.mkdir()
    config = AutoConfig.from_pretrained(str(model_dir))
    stats = prune_streaming(model_dir, config, plan, out, igia, 0.3, rule, shard)
    return ref, out, stats


@pytest.mark.parametrize("rule", ["sign_sum", "fisher", "ties", "none"])
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, tiny_scores, rule):
    model_dir = _sharded(tmp_path / "model")
    assert (model_dir / "model.safetensors.index.json").is_file()  # the input is sharded
    igia = tiny_scores / "igia.safetensors"
    ref, out, stats = _in_memory_and_streamed(tmp_path, model_dir, rule, igia=igia)
    a, b = folder_tensors(ref), folder_tensors(out)
    assert set(a) <= set(b) and set(b) - set(a) <= {"lm_head.weight"}  # save_pretrained drops the tied head
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.loads((ref / "gradpruner.json").read_text())["merge_stats"]
    assert {k: v["changed_fraction"] for k, v in stats.items()} == {k: v["changed_fraction"] for k, v in meta.items()}
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())


def test_streamed_checkpoint_loads_and_generates_like_the_in_memory_one(tmp_path, tiny_scores):
    model_dir = _sharded(tmp_path / "model")
    ref, out, _ = _in_memory_and_streamed(tmp_path, model_dir, "sign_sum", igia=tiny_scores / "igia.safetensors")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    m_ref, m_out = (AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in (ref, out))
    same = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert m_out.config.num_hidden_layers == 5 and same(m_out.config) == same(m_ref.config)
    with torch.no_grad():
        assert torch.equal(m_ref(ids).logits, m_out(ids).logits)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    model_dir = _sharded(tmp_path / "model", dtype=torch.bfloat16)
    ref, out, _ = _in_memory_and_streamed(tmp_path, model_dir, "ties")
    a, b = folder_tensors(ref), folder_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in b.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_other_architectures_stream_with_their_layer_types(tmp_path, arch):
    model_dir = _sharded(tmp_path / "model", arch=arch)
    ref, out, _ = _in_memory_and_streamed(tmp_path, model_dir, "none")
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    a, b = folder_tensors(ref), folder_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_shard_when_it_fits(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    prune_streaming(model_dir, AutoConfig.from_pretrained(str(model_dir)), PLAN, out, None, 0.2, "none", 10**9)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_stream_problem_names_what_is_in_the_way(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    config = AutoConfig.from_pretrained(str(model_dir))
    assert stream_problem(model_dir, config, PLAN) is None
    assert "hidden size" in stream_problem(model_dir, config, {**PLAN, "hidden": {"keep": [0]}})
    assert "not a local folder" in stream_problem("org/model", config, PLAN)
    other = tmp_path / "renamed"
    other.mkdir()
    from safetensors.torch import save_file

    save_file({"transformer.h.0.w": torch.zeros(2)}, str(other / "model.safetensors"))
    assert "parameter names" in stream_problem(other, config, PLAN)


def test_truncated_shard_is_one_sentence(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GradPrunerError, match="truncated"):
        tensor_files(model_dir)


def test_prune_streams_by_default_and_says_so(tmp_path, tiny_scores):
    from gradpruner.cli import main

    model_dir = save_tiny_model_dir(tmp_path / "model")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**PLAN, "scores_file": str(tiny_scores / "scores.json")}))
    assert main(["prune", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "a"),
                 "--max-shard-size", "30KB"]) == 0
    meta = json.loads((tmp_path / "a" / "gradpruner.json").read_text())
    assert meta["out_of_core"] is True and len(meta["merge_stats"]) == 3 * 7  # 3 merged layers x 7 modules
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    assert main(["prune", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "b"),
                 "--in-memory"]) == 0
    assert json.loads((tmp_path / "b" / "gradpruner.json").read_text())["out_of_core"] is False
    a, b = folder_tensors(tmp_path / "a"), folder_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_out_of_core_refused_when_the_input_does_not_allow_it(tmp_path, capsys, monkeypatch):
    from gradpruner.cli import main
    from gradpruner.pruning import streamed as shards

    model_dir = save_tiny_model_dir(tmp_path / "model")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**PLAN, "merge": {}}))
    args = ["prune", "--model", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "x")]
    assert main(args + ["--max-shard-size", "big", "--density", "2"]) == 2  # every problem at once
    err = capsys.readouterr().err
    assert "--max-shard-size 'big'" in err and "--density" in err and not (tmp_path / "x").exists()
    monkeypatch.setattr(shards, "stream_problem", lambda *a: "the plan also prunes the hidden size")
    assert main(args + ["--out-of-core"]) == 2
    err = capsys.readouterr().err
    assert "--out-of-core cannot prune" in err and "hidden size" in err and "drop --out-of-core" in err
    assert not (tmp_path / "x").exists()
    assert main(args) == 0  # auto: falls back to loading the model
    assert json.loads((tmp_path / "x" / "gradpruner.json").read_text())["out_of_core"] is False


@pytest.mark.parametrize("text, value", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30),
                                         ("1.5 kb", 1500), (123, 123), ("77", 77)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["big", "-1GB", "0", "", "2XB", True])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(GradPrunerError, match="max-shard-size"):
        parse_size(text)
