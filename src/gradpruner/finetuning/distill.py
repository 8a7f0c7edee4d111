"""Logit distillation for the recovery fine-tune: the pruned model learns the task's labels and,
on the same tokens, the output distribution of a teacher (the dense fine-tuned model).

    loss = (1 − α) · CE(student, labels) + α · τ² · KL(teacher_τ ‖ student_τ)

averaged over the completion tokens only (the positions whose label is not -100), so the prompt
costs nothing and the vocabulary-sized softmax is taken only where the loss is. τ is the
temperature (Hinton et al. 2015); τ² keeps the gradient scale independent of τ.

The teacher either runs every step (``kd_loss`` on its full logits) or was run once before training
and left its top-k logits per completion token (``finetuning.teacher_cache``); then ``topk_kd_loss``
takes the teacher's distribution renormalised over those k tokens, p̃ = softmax(t_k / τ), and the
student's full-vocabulary log-probabilities gathered at the same k ids:

    τ² · Σ_{i ∈ top-k} p̃_i · (log p̃_i − log q_i),   q = softmax(s / τ) over the whole vocabulary

With k = the vocabulary size this is exactly ``kd_loss``. With fewer it ignores the teacher's tail
(the mass outside the top k) and equals KL(p̃ ‖ q̃) − log Σ_{top-k} q, q̃ the student renormalised over
the k ids: zero only when the student puts all its mass on those k in the teacher's proportions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from gradpruner.data.examples import IGNORE_INDEX
from gradpruner.errors import GradPrunerError


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


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean over completion positions of Σ_k p̃ (log p̃ − log q) on the teacher's cached top-k.

    ``teacher_values`` and ``teacher_indices`` are [rows, k]: one row per completion position, in the
    order ``student_logits[:, :-1][mask]`` lists them (example by example, positions ascending)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    rows = int(mask.sum())
    if teacher_values.shape[0] != rows or teacher_indices.shape != teacher_values.shape:
        raise GradPrunerError(f"The cached teacher logits have {teacher_values.shape[0]} rows for a batch with "
                              f"{rows} completion tokens; delete the checkpoints folder's teacher cache and rerun.")
    if rows == 0:
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][mask].float() / temperature
    log_q = F.log_softmax(s, -1).gather(-1, teacher_indices.long())
    log_p = F.log_softmax(teacher_values.float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


class DistillTrainer(Trainer):
    """A ``Trainer`` whose loss mixes the labels' cross-entropy with the teacher's logits: a ``teacher``
    run every step, or (``teacher=None``) the cached top-k rows each batch carries as
    ``teacher_values`` and ``teacher_indices`` (``teacher_cache.CachedTeacherCollator``)."""

    def __init__(self, *args, teacher=None, alpha: float = 0.5, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        if teacher is not None:
            teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        values, indices = inputs.pop("teacher_values", None), inputs.pop("teacher_indices", None)
        out = model(**inputs)
        if self.teacher is None:
            kd = topk_kd_loss(out.logits, values, indices, inputs["labels"], self.temperature)
        else:
            with torch.no_grad():
                t = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
            kd = kd_loss(out.logits, t, inputs["labels"], self.temperature)
        loss = (1 - self.alpha) * out.loss + self.alpha * kd
        return (loss, out) if return_outputs else loss
