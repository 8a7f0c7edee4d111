"""The fine-tune stage's settings: one field per setting, its default and help (CLI, YAML and API alike)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradpruner.util.options import opt

MODES = {"lora": "LoRA on every decoder-layer linear, merged into the weights after training",
         "full": "every parameter trained",
         "last_layers": "only the last train_last decoder layers and the final norm trained (lm_head too with train_head)"}
# The paper uses AdamW at 1e-5 for both modes. LoRA trains a small low-rank update that starts at
# zero and needs a much larger step to move in the same number of steps, hence 2e-4 (the usual LoRA lr).
# last_layers trains full weights like full (only fewer of them), hence full's 1e-5.
DEFAULT_LR = {"lora": 2e-4, "full": 1e-5, "last_layers": 1e-5}


@dataclass
class FinetuneConfig:
    """``batch_size`` is examples per optimizer step (split over ``grad_accum`` and the processes)."""

    mode: str = opt("lora", "lora (adapters merged into the saved weights), full, or last_layers (the last "
                    "train_last decoder layers and the final norm, the rest frozen)")
    lr: float | None = opt(None, "learning rate (empty: 2e-4 for lora, 1e-5 for full and last_layers)")
    epochs: float = opt(3.0, "passes over the training data, the paper's 3 (ignored with max_steps)")
    max_steps: int | None = opt(None, "optimizer steps; overrides epochs when set")
    batch_size: int = opt(8, "examples per optimizer step, over all processes (the paper uses 64)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_length: int = opt(512, "tokens per example")
    rank: int = opt(8, "LoRA rank")
    alpha: float = opt(32, "LoRA alpha")
    train_last: int = opt(3, "last_layers mode: how many of the last decoder layers are trained (with the final norm)")
    train_head: bool = opt(False, "last_layers mode: also train lm_head; on a model that ties it to the input "
                           "embeddings (SmolLM2, Gemma) that trains the embedding matrix too (nothing is untied)")
    lora_dropout: float = opt(0.05, "LoRA dropout (0 makes runs on 1 and N processes give the same weights)")
    warmup_ratio: float = opt(0.03, "fraction of the optimizer steps with linear warmup")
    lr_scheduler: str = opt("cosine", "linear, cosine (decays to 0 at the end), constant or constant_with_warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip gradients at this norm (0 turns clipping off)")
    seed: int = opt(0, "LoRA init, dropout and data order", run=False)
    save_steps: int = opt(50, "checkpoint every N optimizer steps (and at the end)")
    logging_steps: int = opt(10, "a loss point every N optimizer steps")
    limit: int | None = opt(None, "train on the first K examples only")
    distill_from: str | None = opt(None, "teacher model whose logits join the loss", run=False)
    distill_alpha: float = opt(0.5, "weight of the distillation term (1 - alpha for the labels)")
    distill_temperature: float = opt(1.0, "softmax temperature of the distillation term")
    distill_cache: bool = opt(True, "with a teacher: run it once before training and keep its top-k logits of the "
                              "completion tokens (OUT.checkpoints/teacher_topk.safetensors); off: the teacher runs every step")
    distill_top_k: int = opt(64, "teacher logits kept per token with distill_cache (the KD term is renormalised over them)")

    def resolved(self) -> FinetuneConfig:
        return dataclasses.replace(self, lr=DEFAULT_LR[self.mode] if self.lr is None else self.lr)
