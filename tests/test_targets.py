"""Budgets users think in: --target-memory (exact arithmetic) and --target-latency (a measured binary search)."""
import json

import pytest
import torch

from gradpruner import api
from gradpruner.errors import GradPrunerError
from gradpruner.measure import targets
from gradpruner.measure.targets import (
    GIB,
    layers_for_latency,
    layers_for_memory,
    weight_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layers_for_memory_takes_layers_in_the_plans_order():
    layer = [1 * GIB, 2 * GIB, 3 * GIB]  # a 10 GiB model, layers of 1, 2 and 3 GiB; the plan removes 2, then 0
    assert layers_for_memory(10 * GIB, layer, [2, 0], 10) == 0
    assert layers_for_memory(10 * GIB, layer, [2, 0], 7) == 1  # 10 - 3
    assert layers_for_memory(10 * GIB, layer, [2, 0], 6.5) == 2  # 7 - 1 = 6
    with pytest.raises(GradPrunerError, match="cannot be reached.*6.000 GiB"):
        layers_for_memory(10 * GIB, layer, [2, 0], 5)
    with pytest.raises(GradPrunerError, match="positive number of GiB"):
        layers_for_memory(10 * GIB, layer, [2, 0], 0)


def test_weight_bytes_counts_tied_tensors_once():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight  # tied, like an LM head
    assert weight_bytes(m) == 40 * 4 and weight_bytes(m, 2) == 40 * 2


class _Stub:
    def __init__(self, n):
        self.n = n


def test_layers_for_latency_binary_search(monkeypatch):
    # prefill time 1 + layers kept: the dense 8-layer model takes 9; removing k leaves (9 - k) / 9
    monkeypatch.setattr(targets, "latency", lambda m, reps=5: {"prefill_s": 1.0 + m.n, "decode_tokens_per_s": 1 / (1.0 + m.n)})
    built = []

    def build(k):
        built.append(k)
        return _Stub(8 - k)

    k, ratios = layers_for_latency(_Stub(8), build, 8, 0.5, echo=lambda s: None)
    assert k == 5 and ratios[5] == pytest.approx(4 / 9) and ratios[4] == pytest.approx(5 / 9)
    assert len(built) <= 4  # 7, then halving: far fewer than the 8 counts
    k, _ = layers_for_latency(_Stub(8), build, 8, 0.5, kind="decode", echo=lambda s: None)
    assert k == 5
    with pytest.raises(GradPrunerError, match="cannot be reached on this machine"):
        layers_for_latency(_Stub(8), build, 8, 0.1, echo=lambda s: None)  # one layer left: 2 / 9
    with pytest.raises(GradPrunerError, match="between 0 and 1"):
        layers_for_latency(_Stub(8), build, 8, 1.2, echo=lambda s: None)


def test_plan_with_target_memory_on_a_tiny_model(tiny_llama, tiny_scores, tmp_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    per_layer = sum(p.numel() for p in m.model.layers[0].parameters()) * 4  # float32 checkpoint, equal layers
    total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()) * 4
    want = (total - 3 * per_layer) / GIB  # exactly three layers' worth below the dense model
    res = api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", model=str(tiny_llama), target_memory=want)
    assert len(res["drop"]) == 3 and res["target"]["bytes_after"] == total - 3 * per_layer
    assert json.loads((tmp_path / "plan.json").read_text())["target"]["kind"] == "memory"
    with pytest.raises(GradPrunerError, match="give --model"):
        api.plan(tiny_scores / "scores.json", tmp_path / "p2.json", target_latency=0.7)
    with pytest.raises(GradPrunerError, match="exactly one of --prune"):
        api.plan(tiny_scores / "scores.json", tmp_path / "p3.json", model=str(tiny_llama), prune=2, target_memory=want)


def test_plan_with_target_latency_measures_the_model(tiny_llama, tiny_scores, tmp_path):
    res = api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", model=str(tiny_llama), target_latency=0.9)
    t = res["target"]
    assert t["kind"] == "latency" and t["measured"] <= 0.9 and len(res["drop"]) >= 1
    assert t["ratios"][str(len(res["drop"]))] == t["measured"]
