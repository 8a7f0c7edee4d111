"""Recovery after pruning: the last_layers mode (only the last decoder layers and the final norm move)
and distillation from cached top-k teacher logits (the loss against its formula and the online KD,
a run against the online run, the cache reused on resumption), and how the run config keys them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import Interrupt, folder_tensors
from transformers import AutoConfig, TrainerCallback

from gradpruner.errors import GradPrunerError
from gradpruner.finetuning import finetune as ft
from gradpruner.finetuning import teacher_cache
from gradpruner.finetuning.distill import kd_loss, topk_kd_loss
from gradpruner.finetuning.finetune import FinetuneConfig, checkpoint_dir, finetune
from gradpruner.pipeline.config import RunConfig
from gradpruner.pipeline.run import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FAST = {"lr": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "batch_size": 8,
        "max_length": 64}



def layer_params(c) -> int:
    """Parameters of one Llama decoder layer, from the config: attention, MLP and two RMSNorms."""
    head_dim = c.hidden_size // c.num_attention_heads
    attn = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.num_key_value_heads * head_dim
    return attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


# --- last_layers ----------------------------------------------------------------------------------

def test_last_layers_trains_only_the_last_layers_and_the_final_norm(tiny_llama, qa_file, tmp_path):
    c = AutoConfig.from_pretrained(tiny_llama)
    assert c.tie_word_embeddings and c.num_hidden_layers == 8
    cfg = FinetuneConfig(mode="last_layers", train_last=3, max_steps=4, **FAST)
    rec = finetune(tiny_llama, tmp_path / "o", data=qa_file, config=cfg, progress=False)
    before, after = folder_tensors(tiny_llama), folder_tensors(tmp_path / "o")
    expected = {k for k in before if k == "model.norm.weight" or any(k.startswith(f"model.layers.{i}.") for i in (5, 6, 7))}
    assert len(expected) == 3 * 9 + 1  # 7 linears and 2 norms a layer, and the final norm
    assert changed(before, after) == expected
    assert rec["trainable_params"] == 3 * layer_params(c) + c.hidden_size == 111_040
    assert json.loads((tmp_path / "o" / "finetune.json").read_text())["trainable_params"] == 111_040
    assert rec["config"]["lr"] == 1e-3 and ft.validate_config(FinetuneConfig(mode="last_layers")).lr == 1e-5


def test_train_head_on_a_tied_model_moves_the_embeddings(tiny_llama, qa_file, tmp_path):
    c = AutoConfig.from_pretrained(tiny_llama)
    cfg = FinetuneConfig(mode="last_layers", train_last=1, train_head=True, max_steps=3, **FAST)
    rec = finetune(tiny_llama, tmp_path / "o", data=qa_file, config=cfg, progress=False)
    before, after = folder_tensors(tiny_llama), folder_tensors(tmp_path / "o")
    moved = changed(before, after)
    assert "model.embed_tokens.weight" in moved  # the tied head is the embedding matrix
    assert moved == {"model.embed_tokens.weight", "model.norm.weight"} | {k for k in before if k.startswith("model.layers.7.")}
    # the tied matrix counts once
    assert rec["trainable_params"] == layer_params(c) + c.hidden_size + c.vocab_size * c.hidden_size
    assert AutoConfig.from_pretrained(tmp_path / "o").tie_word_embeddings  # nothing was untied


def test_train_last_must_fit_the_model(tiny_llama, qa_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(GradPrunerError, match="--train-last 9 is more than the model's 8"):
        finetune(tiny_llama, tmp_path / "o", data=qa_file, config=FinetuneConfig(mode="last_layers", train_last=9))
    with pytest.raises(GradPrunerError, match="--train-last"):
        finetune(tiny_llama, tmp_path / "o", data=qa_file, config=FinetuneConfig(mode="last_layers", train_last=0))
    with pytest.raises(GradPrunerError, match="--distill-top-k"):
        finetune(tiny_llama, tmp_path / "o", data=qa_file, config=FinetuneConfig(distill_top_k=0))


# --- the cached top-k KD loss ---------------------------------------------------------------------

def test_topk_kd_loss_against_a_direct_computation():
    s = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -2.0]]])
    labels = torch.tensor([[-100, 3, 1]])  # positions 0 and 1 predict completion tokens
    values = torch.tensor([[4.0, 1.0], [2.0, 0.0]])  # the teacher's top-2 logits at positions 0 and 1
    indices = torch.tensor([[3, 0], [1, 2]])
    tau = 2.0
    by_hand = 0.0
    for row, pos in enumerate((0, 1)):
        z = sum(torch.exp(s[0, pos] / tau)).item()
        p = [torch.exp(values[row, j] / tau).item() for j in range(2)]
        p = [x / sum(p) for x in p]
        for j in range(2):
            q = torch.exp(s[0, pos, indices[row, j]] / tau).item() / z
            by_hand += p[j] * (torch.log(torch.tensor(p[j])) - torch.log(torch.tensor(q))).item()
    got = topk_kd_loss(s, values, indices, labels, tau)
    assert float(got) == pytest.approx(by_hand / 2 * tau**2, rel=1e-5)
    with pytest.raises(GradPrunerError, match="rows"):
        topk_kd_loss(s, values[:1], indices[:1], labels)
    assert float(topk_kd_loss(s, values[:0], indices[:0], torch.full((1, 3), -100))) == 0.0


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_with_the_whole_vocabulary_is_the_online_kd_loss(tau):
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 50), torch.randn(3, 6, 50) * 3
    labels = torch.full((3, 6), -100)
    labels[0, 2:], labels[1, 5], labels[2, 1:4] = 7, 8, 9
    mask = labels[:, 1:] != -100
    values, indices = t[:, :-1][mask].topk(50, dim=-1)
    assert float(topk_kd_loss(s, values, indices, labels, tau)) == pytest.approx(float(kd_loss(s, t, labels, tau)),
                                                                                 abs=1e-5)
    # fewer tokens: the teacher's tail is dropped, the loss is still ≥ 0 and 0 only for the teacher itself
    v8, i8 = t[:, :-1][mask].topk(8, dim=-1)
    assert float(topk_kd_loss(s, v8, i8, labels, tau)) > 0
    assert float(topk_kd_loss(t, *t[:, :-1][mask].topk(50, dim=-1), labels, tau)) == pytest.approx(0.0, abs=1e-6)


# --- distillation runs ----------------------------------------------------------------------------

DISTILL = {"max_steps": 3, "batch_size": 4, "limit": 12, "max_length": 64, "distill_alpha": 0.5, "logging_steps": 1,
           "lora_dropout": 0.0, "lr": 1e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0}


def test_cached_whole_vocabulary_run_matches_the_online_run(tiny_llama, qa_file, tmp_path, monkeypatch):
    vocab = AutoConfig.from_pretrained(tiny_llama).vocab_size
    online = finetune(tiny_llama, tmp_path / "online", data=qa_file, progress=False,
                      config=FinetuneConfig(distill_from=str(tiny_llama), distill_cache=False, **DISTILL))
    assert "teacher_cache" not in online
    loads = []
    real = ft.load_model
    monkeypatch.setattr(ft, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    cached = finetune(tiny_llama, tmp_path / "cached", data=qa_file, progress=False,
                      config=FinetuneConfig(distill_from=str(tiny_llama), distill_top_k=vocab + 5, **DISTILL))
    assert len(loads) == 2  # the student, and the teacher once for the cache (not again for training)
    info = cached["teacher_cache"]
    assert info["top_k"] == vocab and not info["reused"] and info["rows"] > 0
    assert info["file"] == str(checkpoint_dir(tmp_path / "cached") / "teacher_topk.safetensors")
    assert not checkpoint_dir(tmp_path / "cached").exists()  # deleted with the checkpoints
    for a, b in zip(online["loss_curve"], cached["loss_curve"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    # the teacher saw other batches (other padding) before training: float noise, which AdamW's
    # normalised steps lift from ~1e-7 to ~1e-5 in weights whose gradient is near zero
    a, b = folder_tensors(tmp_path / "online"), folder_tensors(tmp_path / "cached")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def test_top_k_starts_above_zero_for_the_student_equal_to_its_teacher(tiny_llama, qa_file, tmp_path):
    # LoRA B = 0: the student starts as the teacher; with alpha 1 the first loss is −log(top-k mass) > 0
    cfg = FinetuneConfig(distill_from=str(tiny_llama), distill_top_k=16, **{**DISTILL, "distill_alpha": 1.0,
                                                                             "max_steps": 1})
    rec = finetune(tiny_llama, tmp_path / "o", data=qa_file, config=cfg, progress=False)
    assert rec["teacher_cache"]["top_k"] == 16 and 0 < rec["loss_curve"][0]["loss"] < 10


class SeeCache(TrainerCallback):
    """The cache file's identity when training (re)starts."""

    def __init__(self, path: Path):
        self.path, self.seen = path, None

    def on_train_begin(self, args, state, control, **kwargs):
        st = self.path.stat()
        self.seen = (st.st_ino, st.st_mtime_ns)


def test_resume_reuses_the_cache(tiny_llama, qa_file, tmp_path, monkeypatch):
    cfg = FinetuneConfig(distill_from=str(tiny_llama), distill_top_k=32, save_steps=2,
                         **{**DISTILL, "max_steps": 4})
    whole = finetune(tiny_llama, tmp_path / "a", data=qa_file, config=cfg, progress=False)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False, callbacks=(Interrupt(2),))
    path = teacher_cache.cache_path(checkpoint_dir(out))
    assert path.is_file() and ft.last_checkpoint(checkpoint_dir(out)).name == "checkpoint-2"
    st = path.stat()
    monkeypatch.setattr(teacher_cache, "teacher_topk", lambda *a, **k: pytest.fail("the teacher ran again"))
    see = SeeCache(path)
    rec = finetune(tiny_llama, out, data=qa_file, config=cfg, resume=True, progress=False, callbacks=(see,))
    assert see.seen == (st.st_ino, st.st_mtime_ns)  # the same file, not rewritten
    assert rec["teacher_cache"]["reused"] and rec["resumed_from"].endswith("checkpoint-2")
    assert not checkpoint_dir(out).exists()
    a, b = folder_tensors(tmp_path / "a"), folder_tensors(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert rec["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-5)


@pytest.mark.parametrize("teacher", [False, True])
def test_checkpoints_from_before_these_settings_resume(tiny_llama, qa_file, tmp_path, teacher):
    """A checkpoints folder written before train_last, train_head and the cache existed resumes with
    the defaults (and, distilling, with the teacher run every step, as it was made)."""
    extra = {"distill_from": str(tiny_llama), "distill_cache": False} if teacher else {}
    cfg = FinetuneConfig(save_steps=1, **{**DISTILL, "max_steps": 2}, **extra)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False, callbacks=(Interrupt(1),))
    run_file = checkpoint_dir(out) / ft.RUN_FILE
    run = json.loads(run_file.read_text())
    for k in ("train_last", "train_head", "distill_cache", "distill_top_k"):
        del run["config"][k]
    run_file.write_text(json.dumps(run))
    rec = finetune(tiny_llama, out, data=qa_file, config=cfg, resume=True, progress=False)
    assert rec["resumed_from"].endswith("checkpoint-1")
    if teacher:  # but not with the cache: that is another setting
        other = checkpoint_dir(tmp_path / "o2")
        (other / "checkpoint-1").mkdir(parents=True)
        (other / "checkpoint-1" / "trainer_state.json").write_text("{}")
        (other / ft.RUN_FILE).write_text(json.dumps(run))
        with pytest.raises(GradPrunerError, match="--distill-cache"):
            finetune(tiny_llama, tmp_path / "o2", data=qa_file, resume=True, progress=False,
                     config=dataclasses.replace(cfg, distill_cache=True))


def test_a_cache_made_for_other_examples_is_rebuilt(tiny_llama, qa_file, tmp_path):
    from gradpruner.data.examples import load_examples, tokenize
    from gradpruner.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_llama)
    features = tokenize(load_examples(data=qa_file)[:6], tok, max_length=64)
    path = tmp_path / "c" / "teacher_topk.safetensors"
    args = (tiny_llama, lambda: load_model(tiny_llama), features, 8, 4, tok.pad_token_id)
    cache, info = teacher_cache.load_or_build(path, *args)
    assert not info["reused"] and cache["values"].shape == (info["rows"], 8)
    assert teacher_cache.load_or_build(path, *args)[1]["reused"]
    other = (tiny_llama, args[1], features[:5], 8, 4, tok.pad_token_id)
    again, info = teacher_cache.load_or_build(path, *other)
    assert not info["reused"] and again["offsets"].numel() == 6


# --- run config keys ------------------------------------------------------------------------------

def _keys(tmp_path, **finetune):
    cfg = RunConfig(out=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **finetune))
    return Run(cfg, echo=lambda *a: None).keys


def test_new_settings_key_only_where_they_change_what_is_computed(tmp_path):
    base = _keys(tmp_path)
    assert _keys(tmp_path, train_last=5, train_head=True, distill_cache=False, distill_top_k=8) == base  # lora, no teacher
    last = _keys(tmp_path, mode="last_layers")
    assert last["pruned_ft"] != base["pruned_ft"] and last["score"] == base["score"]
    assert _keys(tmp_path, mode="last_layers", train_last=5)["pruned_ft"] != last["pruned_ft"]
    online = _keys(tmp_path, distill="dense_ft", distill_cache=False)
    cached = _keys(tmp_path, distill="dense_ft")
    assert online["dense_ft"] == cached["dense_ft"] == base["dense_ft"]
    assert len({online["pruned_ft"], cached["pruned_ft"], base["pruned_ft"]}) == 3
    assert _keys(tmp_path, distill="dense_ft", distill_cache=False, distill_top_k=8) == online  # k unused online
    assert _keys(tmp_path, distill="dense_ft", distill_top_k=8)["pruned_ft"] != cached["pruned_ft"]
