"""Evaluation on held-out data. For now: mean loss on completion tokens (the training objective)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .data import PadCollator


@torch.no_grad()
def heldout_loss(model, tokenizer, features: list[dict], batch_size: int = 8, desc: str = "held-out loss") -> float:
    """Mean cross-entropy per completion token over ``features`` (tokenised examples with labels)."""
    model.eval()
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(features), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate(features[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = labels != -100
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total += float(-(picked * mask).sum())
        count += int(mask.sum())
    return total / count if count else math.nan
