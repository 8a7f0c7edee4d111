"""Fine-tuning on tiny models: LoRA merged and full mode, checkpoints and resumption, bad input."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, folder_tensors
from transformers import AutoModelForCausalLM

from gradpruner.errors import GradPrunerError
from gradpruner.finetuning import finetune as ft
from gradpruner.finetuning.finetune import FinetuneConfig, checkpoint_dir, finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# A high lr and a constant schedule so a few dozen steps on the tiny model reliably lower the loss.
FAST = dict(lr=1e-2, lr_scheduler="constant", warmup_ratio=0.0, logging_steps=1, batch_size=8)
RECORD_FIELDS = {"config", "model", "task", "data", "train_examples", "optimizer_steps", "loss_curve",
                 "train_loss", "final_loss", "wall_seconds", "peak_rss_mib", "versions", "resumed_from"}



def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def captured(monkeypatch):
    """The in-memory model that finetune() hands to save_model."""
    models = []

    def spy(model, *args, **kwargs):
        models.append(model)
        return ft_save(model, *args, **kwargs)

    ft_save = ft.save_model
    monkeypatch.setattr(ft, "save_model", spy)
    return models


def _check_trained(tiny_llama, out, record, in_memory, mode):
    before, after = folder_tensors(tiny_llama), folder_tensors(out)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if mode == "lora":  # only decoder-layer linears carry LoRA
        assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed)
    else:
        assert len(changed) == len(before)
    curve = record["loss_curve"]
    assert [p["step"] for p in curve] == list(range(1, record["optimizer_steps"] + 1))
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert record["train_loss"] == pytest.approx(sum(p["loss"] for p in curve) / len(curve))
    assert RECORD_FIELDS <= record.keys() and record["config"]["mode"] == mode
    assert not any("adapter" in p.name for p in out.iterdir())
    assert json.loads((out / "finetune.json").read_text()) == record
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, in_memory(ids).logits, rtol=0, atol=1e-5)
    assert not checkpoint_dir(out).exists()


def test_lora_merges_into_a_plain_model_and_lowers_the_loss(tiny_llama, qa_file, tmp_path, captured):
    before = digest(tiny_llama)
    out = tmp_path / "ft"
    record = finetune(tiny_llama, out, data=qa_file, config=FinetuneConfig(max_steps=30, **FAST), progress=False)
    assert record["optimizer_steps"] == 30 and record["train_examples"] == 40
    assert record["config"]["rank"] == 8 and record["config"]["lr"] == 1e-2
    _check_trained(tiny_llama, out, record, captured[0], "lora")
    assert digest(tiny_llama) == before  # the input folder is never modified


def test_full_mode_trains_every_parameter(tiny_llama, qa_file, tmp_path, captured):
    out = tmp_path / "ft"
    cfg = FinetuneConfig(mode="full", max_steps=20, **{**FAST, "lr": 1e-3})
    record = finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False)
    _check_trained(tiny_llama, out, record, captured[0], "full")


def test_default_lr_depends_on_the_mode():
    assert ft.validate_config(FinetuneConfig()).lr == 2e-4
    assert ft.validate_config(FinetuneConfig(mode="full")).lr == 1e-5


def test_warmup_ratio_warms_up_the_learning_rate(tiny_llama, qa_file, tmp_path):
    # 4 optimizer steps, ratio 0.5: ceil(4 × 0.5) = 2 warmup steps, the rate rising linearly from 0, so the
    # steps run at 0, lr/2, then lr and lr (each logged point is the rate its step used)
    cfg = FinetuneConfig(max_steps=4, lr=1e-2, warmup_ratio=0.5, lr_scheduler="constant_with_warmup",
                         logging_steps=1, batch_size=8)
    record = finetune(tiny_llama, tmp_path / "o", data=qa_file, config=cfg, progress=False)
    rates = [p["learning_rate"] for p in record["loss_curve"]]
    assert rates == pytest.approx([0.0, 5e-3, 1e-2, 1e-2], abs=1e-12)


def test_every_transformers_allowed_reads_the_warmup_ratio():
    # finetune passes --warmup-ratio to TrainingArguments as warmup_steps, which transformers reads as a ratio
    # of the optimizer steps only from version 5 on (4.x takes 0.03 as 0.03 steps: no warmup at all)
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    spec = next(r.specifier for r in map(Requirement, project["dependencies"]) if r.name == "transformers")
    assert not spec.contains(Version("4.99")) and spec.contains(Version("5.0"))
    import transformers

    assert spec.contains(transformers.__version__)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_llama, qa_file, tmp_path, mode):
    # 40 examples / 8 per step = 5 steps an epoch; step 8 is mid-epoch, with accumulation and dropout on.
    cfg = FinetuneConfig(mode=mode, max_steps=12, save_steps=4, logging_steps=4, lr=1e-2 if mode == "lora" else 1e-3,
                         batch_size=8, grad_accum=2, lora_dropout=0.1)
    record_a = finetune(tiny_llama, tmp_path / "a", data=qa_file, config=cfg, progress=False)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False, callbacks=(Interrupt(8),))
    assert not out.exists() and not list(tmp_path.glob(".b.tmp-*"))
    assert ft.last_checkpoint(checkpoint_dir(out)).name == "checkpoint-8"

    with pytest.raises(GradPrunerError, match="--resume"):  # checkpoints are never silently discarded
        finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False)
    with pytest.raises(GradPrunerError, match="--lr"):  # nor resumed with other settings
        finetune(tiny_llama, out, data=qa_file, config=FinetuneConfig(**{**vars(cfg), "lr": 1e-4}), resume=True)

    record = finetune(tiny_llama, out, data=qa_file, config=cfg, resume=True, progress=False)
    assert record["resumed_from"].endswith("checkpoint-8") and record["optimizer_steps"] == 12
    assert [p["step"] for p in record["loss_curve"]] == [1, 4, 8, 12]  # the curve spans the whole run
    assert record["train_loss"] == pytest.approx(record_a["train_loss"], abs=1e-5)
    a, b = folder_tensors(tmp_path / "a"), folder_tensors(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert not checkpoint_dir(out).exists()


def test_resume_without_checkpoints_starts_afresh_and_says_so(tiny_llama, qa_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gradpruner.finetuning.finetune"):
        record = finetune(tiny_llama, tmp_path / "o", data=qa_file, config=FinetuneConfig(max_steps=2),
                          resume=True, progress=False)
    assert record["resumed_from"] is None and "No checkpoint" in caplog.text


@pytest.mark.parametrize("settings,needle", [
    ({"mode": "lroa"}, "Did you mean 'lora'"),
    ({"lr": 0.0}, "--lr"), ({"lr": -1e-4}, "--lr"), ({"lr": float("nan")}, "--lr"),
    ({"epochs": 0}, "--epochs"), ({"max_steps": 0}, "--max-steps"),
    ({"batch_size": 6, "grad_accum": 4}, "--grad-accum"), ({"lora_dropout": 1.0}, "--lora-dropout"),
    ({"lr_scheduler": "cosin"}, "Did you mean 'cosine'"),
])
def test_bad_settings_are_refused_before_loading(tiny_llama, qa_file, tmp_path, monkeypatch, settings, needle):
    monkeypatch.setattr(ft, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(GradPrunerError, match=needle):
        finetune(tiny_llama, tmp_path / "o", data=qa_file, config=FinetuneConfig(**settings))
    assert not (tmp_path / "o").exists() and not checkpoint_dir(tmp_path / "o").exists()


def test_several_bad_settings_are_reported_together():
    with pytest.raises(GradPrunerError) as err:
        ft.validate_config(FinetuneConfig(lr=-1, rank=0, save_steps=0))
    assert len(err.value.problems) == 3


@pytest.mark.parametrize("save_steps", [1, 50])
def test_non_finite_loss_stops_with_the_step_and_a_hint(tiny_llama, qa_file, tmp_path, save_steps):
    out, cfg = tmp_path / "o", FinetuneConfig(lr=1e30, max_steps=6, save_steps=save_steps)
    with pytest.raises(GradPrunerError, match=r"Non-finite .* step \d+; lower the learning rate \(--lr") as err:
        finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
    if save_steps == 1:  # the checkpoints before the failure stay, and the message says where
        assert str(checkpoint_dir(out)) in str(err.value) and ft.last_checkpoint(checkpoint_dir(out))
    else:  # none was saved: nothing is left behind, and the next run needs no --overwrite
        assert not checkpoint_dir(out).exists()
        finetune(tiny_llama, out, data=qa_file, config=FinetuneConfig(max_steps=1), progress=False)


def test_existing_output_needs_overwrite(tiny_llama, qa_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(GradPrunerError, match="--overwrite"):
        finetune(tiny_llama, out, data=qa_file, config=FinetuneConfig(max_steps=2))
    with pytest.raises(GradPrunerError, match="input"):
        finetune(tiny_llama, tiny_llama / "sub", data=qa_file, config=FinetuneConfig(max_steps=2))
    finetune(tiny_llama, out, data=qa_file, config=FinetuneConfig(max_steps=2, limit=8), overwrite=True,
             progress=False)
    assert ft.read_json(out / "finetune.json", "x")["train_examples"] == 8
