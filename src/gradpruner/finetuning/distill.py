"""Logit distillation for the recovery fine-tune: the pruned model learns the task's labels and,
on the same tokens, the output distribution of a teacher (the dense fine-tuned model).

    loss = (1 − α) · CE(student, labels) + α · τ² · KL(teacher_τ ‖ student_τ)

averaged over the completion tokens only (the positions whose label is not -100), so the prompt
costs nothing and the vocabulary-sized softmax is taken only where the loss is. τ is the
temperature (Hinton et al. 2015); τ² keeps the gradient scale independent of τ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from gradpruner.data.examples import IGNORE_INDEX


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean over completion positions of KL(softmax(t/τ) ‖ softmax(s/τ)).

    Logits are [batch, seq, vocab] and predict the next token, so position i is scored against
    labels[i + 1] — the same shift the causal-LM loss uses."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


class DistillTrainer(Trainer):
    """A ``Trainer`` whose loss mixes the labels' cross-entropy with the teacher's logits."""

    def __init__(self, *args, teacher=None, alpha: float = 0.5, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        with torch.no_grad():
            t = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
        kd = kd_loss(out.logits, t, inputs["labels"], self.temperature)
        loss = (1 - self.alpha) * out.loss + self.alpha * kd
        return (loss, out) if return_outputs else loss
