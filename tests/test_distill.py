"""Logit distillation for the recovery fine-tune: the loss against its formula, and a run."""
import json

import pytest
import torch

from gradpruner.finetuning.distill import kd_loss
from gradpruner.finetuning.finetune import FinetuneConfig, finetune


def test_kd_loss_is_kl_on_completion_positions_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 4], labels[1, 2] = 1, 2, 3  # predicted from positions 2, 3 and 1
    tau = 2.0
    pos = [(0, 2), (1, 3), (1, 1)]
    by_hand = 0.0
    for b, i in pos:
        p = torch.softmax(t[b, i] / tau, -1)
        by_hand += float((p * (p.log() - torch.log_softmax(s[b, i] / tau, -1))).sum())
    assert float(kd_loss(s, t, labels, tau)) == pytest.approx(by_hand / len(pos) * tau**2, rel=1e-5)
    assert float(kd_loss(t, t, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(s, t, torch.full((2, 5), -100))) == 0.0


@pytest.mark.parametrize("teacher", [{"distill_cache": False}, {"distill_top_k": 300}], ids=["online", "cached"])
def test_finetune_with_a_teacher(tiny_llama, qa_file, tmp_path, teacher):
    torch.set_num_threads(1)
    cfg = FinetuneConfig(max_steps=2, batch_size=4, limit=8, max_length=64, distill_from=str(tiny_llama),
                         distill_alpha=1.0, logging_steps=1, lora_dropout=0.0, **teacher)
    rec = finetune(str(tiny_llama), tmp_path / "out", data=qa_file, config=cfg, progress=False)
    # the student starts as the teacher (LoRA B = 0): with alpha 1 the first loss is the KL, 0 (cached:
    # with every one of the tiny vocabulary's 300 logits, the same KL)
    assert rec["loss_curve"][0]["loss"] == pytest.approx(0.0, abs=1e-4)
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["config"]["distill_from"] == str(tiny_llama)
    with pytest.raises(Exception, match="distill-alpha"):
        finetune(str(tiny_llama), tmp_path / "o2", data=qa_file, config=FinetuneConfig(distill_alpha=2.0))
