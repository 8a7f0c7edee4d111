"""The memory each stage needs for an 8B-shaped model, from its config on the meta device (no weights).

The expected parameter count is worked out by hand from Llama-3.1-8B's published shapes, not by the code
under test; the bounds are what a user planning a machine needs to know: which stages fit one 80 GB GPU
(H100) in bfloat16 and which do not.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from gradpruner.measure.memory import stage_memory

GIB = 2**30
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def _hand_count(h=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256) -> int:
    head = h // heads
    attn = h * h + 2 * h * kv * head + h * h            # q, k, v, o
    mlp = 3 * h * inter                                  # gate, up, down
    return vocab * h * 2 + layers * (attn + mlp + 2 * h) + h  # embeddings and head untied, norms


@pytest.fixture(scope="module")
def config():
    return LlamaConfig(**LLAMA_8B)


def test_the_weights_are_8b_parameters_in_the_runtime_dtype(config):
    est = stage_memory(config, torch.bfloat16, "eval")
    assert est["params"] == _hand_count() == 8_030_261_248
    assert est["weights"] == 2 * 8_030_261_248


def test_stage_bounds_for_an_8b_model(config):
    """bfloat16, batch 8 × 512 tokens, LoRA rank 8."""
    ev = stage_memory(config, torch.bfloat16, "eval")
    score = stage_memory(config, torch.bfloat16, "score")
    lora = stage_memory(config, torch.bfloat16, "finetune_lora")
    full = stage_memory(config, torch.bfloat16, "finetune_full")
    prune = stage_memory(config, torch.bfloat16, "prune_in_memory", source_dtype=torch.bfloat16)
    stream = stage_memory(config, torch.bfloat16, "prune_out_of_core", source_dtype=torch.bfloat16)
    assert 15 * GIB < ev["total"] < 18 * GIB             # the weights (14.96 GiB) and one layer's activations
    assert score["total"] < 40 * GIB and lora["total"] == score["total"]  # one 80 GB GPU, with room
    assert score["training_state"] == 8 * (4096 + 4096 + 2 * (4096 + 1024) + 4096 + 4096
                                           + 3 * (4096 + 14336)) * 32 * 16
    assert full["total"] > 80 * GIB                       # full fine-tuning needs sharding (FSDP/ZeRO)
    assert full["training_state"] == 16 * 8_030_261_248
    assert prune["total"] == ev["weights"]
    assert stream["total"] == 2 * 128256 * 4096 * 2      # the embedding, read and written: 2 GiB
    assert stage_memory(config, torch.float32, "eval")["weights"] == 2 * ev["weights"]
