"""The score stage's settings: one field per setting, its default and help (CLI, YAML and API alike)."""
from __future__ import annotations

from dataclasses import dataclass

from gradpruner.util.options import opt

DEFAULT_METHOD = "igia_guarded"


@dataclass
class ScoreConfig:
    method: str = opt(DEFAULT_METHOD, "layer-selection method: igia_guarded (IGIA among the layers block influence lets "
                      "go), igia (the paper's exact method), igia_norm, full_grad, block_influence, removal_loss, taylor, "
                      "removal_taylor, greedy_loss, magnitude, last_n, random, laco or another IGIA variant (igia_greedy: greedy "
                      "removal by measured loss among the lowest-IGIA layers); see docs/methods.md")
    steps: int = opt(40, "early LoRA optimizer steps T to capture (at least 2: step 1 carries no signal)")
    steps_fraction: float | None = opt(None, "T as a fraction of planned_steps (floor 8), e.g. 0.01")
    planned_steps: int | None = opt(None, "optimizer steps of the planned fine-tuning run (with steps_fraction)")
    rank: int = opt(8, "LoRA rank of the early steps")
    alpha: float = opt(32, "LoRA alpha of the early steps")
    lr: float = opt(1e-4, "learning rate of the early steps")
    batch_size: int = opt(8, "examples per optimizer step (the global batch, split over the processes of torchrun / "
                          "accelerate launch)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_length: int = opt(512, "tokens per example (the prompt is truncated from the left)")
    lora_dropout: float = opt(0.0, "LoRA dropout of the early steps")
    max_grad_norm: float = opt(0.0, "clip gradients (0 = off, so raw gradients are scored)")
    adapter: str = opt("lora", "adapter whose gradients IGIA reads: lora or dora")
    fsdp: bool = opt(False, "shard the LoRA-wrapped model with FSDP2 (torch fully_shard: each decoder layer, then the "
                     "whole model) over the processes of torchrun; IGIA methods, 2 or more processes", run=False)
    calib_examples: int = opt(64, "task examples for block_influence, taylor, laco and the guard of igia_guarded")
    laco_group: int = opt(4, "laco: layers per collapse (the base and group-1 merged into it)")
    laco_threshold: float = opt(0.65, "laco: keep a collapse if hidden states stay this cosine-similar")
    greedy_pool: str = opt("all", "greedy_loss: the candidate layers, all or block_influence (the ⌈greedy_pool_factor · "
                           "prune⌉ with the lowest block influence)", choices=("all", "block_influence"))
    greedy_pool_factor: float = opt(2.0, "greedy_loss with greedy_pool block_influence, and igia_greedy: the pool is the "
                                    "⌈factor · prune⌉ layers the guide (block influence, IGIA) ranks lowest")
    greedy_unit: str = opt("layer", "greedy_loss and igia_greedy: remove whole layers, or block: adjacent attention/MLP "
                           "block pairs (a whole layer, or one layer's MLP with the next attention; plan with "
                           "granularity block)", choices=("layer", "block"))
