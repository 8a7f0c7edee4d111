"""Fine-tune a (pruned) model on a task: LoRA merged into the weights, every parameter, or only the
last decoder layers and the final norm (``last_layers``).

Training runs through ``transformers.Trainer`` (AdamW, accelerate underneath). Checkpoints go to the
sibling folder ``<out>.checkpoints`` so an interrupted run can continue with ``resume=True`` and end
with the same weights as an uninterrupted one; the final model is written atomically to ``out`` as a
plain ``save_pretrained`` folder (LoRA merged, no adapter files) with ``finetune.json`` beside it.
Distilling with ``distill_cache`` runs the teacher once before training and keeps its top-k logits in
``<out>.checkpoints/teacher_topk.safetensors`` (``finetuning.teacher_cache``), reused on resumption.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from gradpruner.data.examples import PadCollator, load_examples, tokenize
from gradpruner.data.tasks import SPLIT_SEED
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.finetuning import teacher_cache
from gradpruner.finetuning.config import MODES, FinetuneConfig
from gradpruner.finetuning.last_layers import train_last_layers, trainable_parameters
from gradpruner.models import architectures, sharding
from gradpruner.models.loading import (
    base_model,
    check_model,
    load_model,
    load_tokenizer,
    resolve_model,
    save_model,
    stored_dtype,
)
from gradpruner.models.lora import attach_lora
from gradpruner.models.runtime import resolve as resolve_runtime
from gradpruner.util import distributed, options
from gradpruner.util.atomic import atomic_dir, check_output, read_json, write_json
from gradpruner.util.versions import versions

log = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
RUN_FILE = "finetune_run.json"  # in the checkpoints folder: what the checkpoints were made with
_NO_EFFECT = ("save_steps", "logging_steps")  # may change between a run and its resumption


def validate_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with the lr filled in, or one GradPrunerError listing every bad setting."""
    lookup(MODES, cfg.mode, "fine-tuning mode")
    if cfg.lr_scheduler not in SCHEDULERS:
        lookup(dict.fromkeys(SCHEDULERS), cfg.lr_scheduler, "learning-rate scheduler")
    cfg = cfg.resolved()
    checks = [
        ("--lr", cfg.lr, _positive(cfg.lr), "e.g. 2e-4 for LoRA or 1e-5 for full"),
        ("--epochs", cfg.epochs, _positive(cfg.epochs), "e.g. 3"),
        ("--max-steps", cfg.max_steps, cfg.max_steps is None or _count(cfg.max_steps), "a whole number ≥ 1"),
        ("--batch-size", cfg.batch_size, _count(cfg.batch_size), "a whole number ≥ 1"),
        ("--grad-accum", cfg.grad_accum, _count(cfg.grad_accum) and _count(cfg.batch_size)
         and cfg.batch_size % cfg.grad_accum == 0, "a whole number ≥ 1 that divides --batch-size"),
        ("--max-length", cfg.max_length, _count(cfg.max_length), "e.g. 512"),
        ("--rank", cfg.rank, _count(cfg.rank), "e.g. 8"),
        ("--train-last", cfg.train_last, _count(cfg.train_last), "a whole number ≥ 1, e.g. 3"),
        ("--train-head", cfg.train_head, isinstance(cfg.train_head, bool), "true or false"),
        ("--alpha", cfg.alpha, _positive(cfg.alpha), "e.g. 32"),
        ("--lora-dropout", cfg.lora_dropout, _fraction(cfg.lora_dropout), "a value in [0, 1), e.g. 0.05"),
        ("--warmup-ratio", cfg.warmup_ratio, _fraction(cfg.warmup_ratio), "a value in [0, 1), e.g. 0.03"),
        ("--weight-decay", cfg.weight_decay, _non_negative(cfg.weight_decay), "a value ≥ 0"),
        ("--max-grad-norm", cfg.max_grad_norm, _non_negative(cfg.max_grad_norm), "a value ≥ 0 (0 = no clipping)"),
        ("--seed", cfg.seed, isinstance(cfg.seed, int) and cfg.seed >= 0, "a whole number ≥ 0"),
        ("--save-steps", cfg.save_steps, _count(cfg.save_steps), "a whole number ≥ 1"),
        ("--logging-steps", cfg.logging_steps, _count(cfg.logging_steps), "a whole number ≥ 1"),
        ("--limit", cfg.limit, cfg.limit is None or _count(cfg.limit), "a whole number ≥ 1"),
        ("--distill-alpha", cfg.distill_alpha, _number(cfg.distill_alpha) and 0 <= cfg.distill_alpha <= 1, "a value in [0, 1]"),
        ("--distill-temperature", cfg.distill_temperature, _positive(cfg.distill_temperature), "a value > 0, e.g. 1 or 2"),
        ("--distill-cache", cfg.distill_cache, isinstance(cfg.distill_cache, bool), "true or false"),
        ("--distill-top-k", cfg.distill_top_k, _count(cfg.distill_top_k), "a whole number ≥ 1, e.g. 64"),
    ]
    problems = [f"{flag} {value!r} is invalid; use {hint}." for flag, value, ok, hint in checks if not ok]
    if problems:
        raise GradPrunerError(*problems)
    return cfg


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return _number(x) and x > 0


def _non_negative(x) -> bool:
    return _number(x) and x >= 0


def _fraction(x) -> bool:
    return _number(x) and 0 <= x < 1


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoints of a run writing ``out`` live: the sibling ``<out>.checkpoints``."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def _step_of(checkpoint: Path) -> int:
    tail = checkpoint.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def _complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing ``checkpoint``: its state, written last, is whole JSON."""
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def last_checkpoint(ckpt: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that was completely written (a run
    killed while saving one leaves it without a whole trainer state; the one before is used)."""
    found = [p for p in ckpt.glob("checkpoint-*") if _step_of(p) >= 0 and _complete(p)] if ckpt.is_dir() else []
    return max(found, key=_step_of, default=None)


# --- the run ----------------------------------------------------------------------------------

def _provenance(source) -> dict[str, dict]:
    """The prune and heal records of a gradpruner folder being fine-tuned, carried into the output so its
    model card says everything that was done to it."""
    found = {}
    for name in ("gradpruner.json", "heal.json"):
        try:
            found[name] = json.loads((Path(source) / name).read_text())
        except (OSError, ValueError, TypeError):
            continue
    return found


def finetune(model: str | Path, out: str | Path, task: str | None = None, data: str | Path | None = None,
             data_dir: str | Path | None = None, config: FinetuneConfig | None = None, *, resume: bool = False,
             overwrite: bool = False, progress: bool = True, runtime=None, callbacks: tuple = (),
             **settings) -> dict:
    """Fine-tune ``model`` on ``task`` or a JSONL ``data`` file and save it to ``out``; returns finetune.json.

    ``resume`` continues from the last checkpoint in ``<out>.checkpoints`` (it starts fresh, saying so,
    when there is none). ``callbacks`` are extra ``TrainerCallback`` objects. The settings are the
    fields of ``FinetuneConfig``: pass ``config`` or any of them as keywords.

    ``runtime`` (a ``RuntimeConfig``, a resolved ``Runtime`` or None for auto) says where training runs:
    in LoRA mode the frozen base is held in the runtime's dtype and the adapters in float32; in the full
    and last_layers modes the trained weights are float32. A bfloat16 or float16 runtime trains with
    autocast in that precision. The saved weights keep the source checkpoint's precision (LoRA is merged
    into a base loaded in it).
    """
    config = options.settings(FinetuneConfig, config, settings, "fine-tune setting")
    start = time.monotonic()
    out = Path(out)
    with Collect() as check:  # every problem with the inputs, in one message, before any work
        cfg = check(validate_config, config or FinetuneConfig())
        if cfg is not None:
            check(distributed.check_batch, cfg.batch_size, cfg.grad_accum)
        rt = check(resolve_runtime, runtime)
        source = check(resolve_model, model)
        model_config = check(check_model, source, rt.trust_remote_code, rt.allow_pickle) \
            if source is not None and rt is not None else None
        if cfg is not None and model_config is not None:
            check(_check_mode, cfg, model_config)
        ckpt, replace = check(_check_locations, out, source, resume, overwrite) or (None, False)
        examples = check(load_examples, task=task, data=data, split="train", data_dir=data_dir, seed=SPLIT_SEED)
    main = distributed.is_main()  # with several processes only process 0 writes
    if ckpt.exists() and not resume and main:  # only now that every input is fine: discard what --overwrite replaces
        shutil.rmtree(ckpt)
    tok = load_tokenizer(source, rt.trust_remote_code)
    features = tokenize(examples[: cfg.limit], tok, max_length=cfg.max_length)
    run = {"config": dataclasses.asdict(cfg), "model": str(source), "task": task,
           "data": str(Path(data).resolve()) if data else None, "train_examples": len(features)}
    checkpoint = _resume_point(ckpt, run) if resume else None
    save_dtype = stored_dtype(model_config)
    # the frozen LoRA base in the runtime's precision; weights that are trained in float32
    base = load_model(source, rt, dtype=None if cfg.mode == "lora" else torch.float32)
    if main:
        ckpt.mkdir(parents=True, exist_ok=True)
        write_json(ckpt / RUN_FILE, run)
    try:
        cache = _teacher_cache(cfg, ckpt, features, tok, rt) if cfg.distill_from and cfg.distill_cache else None
        trained, trainer, trainable = _train(base, tok, features, cfg, ckpt, checkpoint, out, progress, callbacks,
                                             rt, reload=lambda dtype=None: load_model(source, rt, dtype=dtype),
                                             save_dtype=save_dtype, cache=cache[0] if cache else None)
    except BaseException:
        if main and last_checkpoint(ckpt) is None:  # nothing to resume from: leave nothing behind
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    record = _record(run, model, trainer, checkpoint, start, rt)
    record["trainable_params"] = trainable
    record["base_model"] = base_model(model)
    if cache is not None:
        record["teacher_cache"] = cache[1]

    def save() -> dict:
        model = trained.to(save_dtype)  # saved in the source's precision
        with atomic_dir(out, overwrite=replace) as tmp:
            save_model(model, tok, tmp, extra_files={**_provenance(source), "finetune.json": record})
        shutil.rmtree(ckpt, ignore_errors=True)
        return record

    # process 0 saves once every process is done (the last checkpoint included); all return its record
    return distributed.on_main(save, wait=True)


def _check_locations(out: Path, source, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """(checkpoints folder, whether ``out`` may be replaced), after checking both locations; nothing
    is removed here."""
    ckpt = checkpoint_dir(out)
    saved = last_checkpoint(ckpt) is not None
    # With resume, an existing out is replaced when checkpoints exist: a run that wrote out but was
    # stopped before it removed its checkpoints.
    replace = overwrite or (resume and saved)
    check_output(out, replace, inputs=(source if isinstance(source, Path) else None,))
    if ckpt.exists() and not resume and saved and not overwrite:
        raise GradPrunerError(f"Checkpoints of an earlier run exist at {ckpt}; pass --resume to continue "
                              "that run or --overwrite to discard them and start afresh.")
    return ckpt, replace


def _resume_point(ckpt: Path, run: dict) -> Path | None:
    """The checkpoint to resume from, after checking it was made with the same settings."""
    checkpoint = last_checkpoint(ckpt)
    if checkpoint is None:
        log.warning("No checkpoint found in %s; starting the fine-tuning run from the beginning.", ckpt)
        return None
    saved = read_json(ckpt / RUN_FILE, "Checkpoint run file")
    differ = [k for k in sorted(set(run) | set(saved)) if k != "config" and run.get(k) != saved.get(k)]
    old, new = _as_made(saved.get("config", {})), run["config"]
    differ += [f"--{k.replace('_', '-')}" for k in sorted(set(old) | set(new))
               if k not in _NO_EFFECT and old.get(k) != new.get(k)]
    if differ:
        raise GradPrunerError(f"The checkpoints in {ckpt} were made with a different {', '.join(differ)}; "
                              "resume with the same settings, or drop --resume and pass --overwrite to start afresh.")
    log.info("Resuming from %s.", checkpoint)
    return checkpoint


def _as_made(old: dict) -> dict:
    """A checkpoints folder's config with the settings added since it was written filled in as the code
    that wrote it behaved: every layer's weights trained as its mode says, a teacher run every step."""
    added = {"train_last": 3, "train_head": False, "distill_top_k": 64, "distill_cache": not old.get("distill_from")}
    return {**added, **old} if old else old


def _check_mode(cfg: FinetuneConfig, model_config) -> None:
    """``--train-last`` fits the model's decoder layers (when its config says how many)."""
    n = getattr(model_config, "num_hidden_layers", None)
    if cfg.mode == "last_layers" and isinstance(n, int) and cfg.train_last > n:
        raise GradPrunerError(f"--train-last {cfg.train_last} is more than the model's {n} decoder layers; "
                              f"use at most {n} (all of them trains every decoder layer and the final norm).")


def _teacher_cache(cfg: FinetuneConfig, ckpt: Path, features: list[dict], tok, rt) -> tuple[dict, dict]:
    """(cached top-k teacher logits, their record): process 0 reads the checkpoints folder's cache or
    builds it; the other processes then read the file it wrote."""
    teacher = resolve_model(cfg.distill_from)
    args = (teacher_cache.cache_path(ckpt), teacher, lambda: load_model(teacher, rt), features, cfg.distill_top_k,
            distributed.per_device_batch(cfg.batch_size, cfg.grad_accum), tok.pad_token_id)
    got = {}

    def main() -> dict:
        got["cache"], record = teacher_cache.load_or_build(*args)
        return record

    record = distributed.on_main(main)
    return (got["cache"] if "cache" in got else teacher_cache.load_or_build(*args)[0]), record


def _peft_model(base, cfg: FinetuneConfig):
    """LoRA on every decoder-layer linear module of ``base``, as ``cfg`` says."""
    return attach_lora(base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                       target_modules=architectures.linear_module_names(base))


def _training_args(cfg: FinetuneConfig, ckpt: Path, progress: bool, rt):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(ckpt), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=distributed.per_device_batch(cfg.batch_size, cfg.grad_accum),
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
        logging_steps=cfg.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed,
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=rt.on_cuda, disable_tqdm=not progress, **rt.training_precision(),
    )


def _train(base, tok, features, cfg, ckpt, checkpoint, out, progress, callbacks, rt, reload=None, save_dtype=None,
           cache=None):
    """(trained plain model, trainer, trainable parameters) after training from scratch or from
    ``checkpoint``; under FSDP or DeepSpeed the model is whole on process 0 only (None elsewhere),
    rebuilt from ``reload()``. ``cache``: the teacher's cached top-k logits (then no teacher is loaded)."""
    from transformers import PrinterCallback, Trainer, set_seed

    set_seed(cfg.seed)
    model = _peft_model(base, cfg) if cfg.mode == "lora" else base
    if cfg.mode == "last_layers":
        train_last_layers(model, cfg.train_last, cfg.train_head)
    trainable = trainable_parameters(model)
    guard = StopOnNonFinite(cfg.lr, out, ckpt)
    extra, cls, collate = {}, Trainer, PadCollator(tok.pad_token_id)
    if cfg.distill_from:
        from gradpruner.finetuning.distill import DistillTrainer

        cls = DistillTrainer
        teacher = None if cache is not None else load_model(resolve_model(cfg.distill_from), rt)
        extra = {"teacher": teacher, "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature}
        if cache is not None:
            features, collate = teacher_cache.with_rows(features), teacher_cache.CachedTeacherCollator(collate, cache)
    trainer = cls(model=model, args=_training_args(cfg, ckpt, progress, rt), train_dataset=features,
                  data_collator=collate, callbacks=[guard, *callbacks], **extra)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when the bars are off
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    model = _whole(trainer, model, cfg, reload)
    if model is None:
        return None, trainer, trainable
    if cfg.mode == "lora":
        model = _in_precision(model, cfg, reload, save_dtype)
    trained = model.merge_and_unload() if cfg.mode == "lora" else model
    return trained.eval(), trainer, trainable


def _in_precision(model, cfg, reload, save_dtype):
    """The trained LoRA model over a base in ``save_dtype``: when the base was held in another precision
    (bfloat16 on a GPU, say), the adapters move onto the base reloaded in the checkpoint's own precision,
    so merging does not round the saved weights to the training precision."""
    base_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    if reload is None or save_dtype is None or base_dtype == save_dtype:
        return model
    adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    del model
    fresh = _peft_model(reload(save_dtype), cfg)
    missing = set(adapters) - set(fresh.state_dict())
    if missing:
        raise RuntimeError(f"adapter weights {sorted(missing)[:3]} have no place in the reloaded model")  # a bug
    fresh.load_state_dict(adapters, strict=False)
    return fresh


def _whole(trainer, model, cfg, reload):
    """``model`` itself for one process or DDP; under FSDP2 or DeepSpeed (sharded weights) the gathered
    state dict loaded into a fresh copy on process 0, None on the others."""
    backend = distributed.grad_backend(trainer.args, trainer.model_wrapped)
    if backend == distributed.PLAIN or reload is None:
        return model
    if backend == distributed.FSDP:  # a collective: every process
        state = sharding.full_state_dict(trainer.model_wrapped)
    else:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not distributed.is_main():
        return None
    fresh = _peft_model(reload(), cfg) if cfg.mode == "lora" else reload(torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise GradPrunerError(f"The gathered weights do not fit the model ({len(missing)} missing, {len(unexpected)} "
                              "unexpected); with DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save.")
    return fresh


class StopOnNonFinite(TrainerCallback):
    """Stops training with a GradPrunerError at the first non-finite gradient or logged loss."""

    def __init__(self, lr: float, out: Path, ckpt: Path):
        self.lr, self.out, self.ckpt = lr, out, ckpt

    def _error(self, what: str, step: int) -> GradPrunerError:
        saved = last_checkpoint(self.ckpt)
        kept = f"; the checkpoints up to {saved.name} stay in {self.ckpt}" if saved else ""
        return GradPrunerError(
            f"Non-finite {what} at optimizer step {step}; lower the learning rate (--lr, now {self.lr:g}) "
            f"or check the data. Nothing was written to {self.out}{kept}."
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad = any(not bool(torch.isfinite(g).all()) for g in grads)
        if distributed.any_process(bad):  # FSDP shards: one process may hold the bad entries
            raise self._error("gradients", state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise self._error("training loss", state.global_step)


# --- the record -------------------------------------------------------------------------------

def _record(run: dict, model_spec, trainer, checkpoint, start: float, rt) -> dict:
    history = trainer.state.log_history
    curve = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"),
              "grad_norm": e.get("grad_norm")} for e in history if "loss" in e]
    return {**run, "model_spec": str(model_spec), "optimizer_steps": trainer.state.global_step,
            "epochs_done": trainer.state.epoch, "resumed_from": str(checkpoint) if checkpoint else None,
            "runtime": {**rt.record(), "trainer_device": str(trainer.args.device),
                        "autocast": "bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else None},
            "train_loss": _mean_loss(curve, _step_of(checkpoint) if checkpoint else 0),
            "final_loss": curve[-1]["loss"] if curve else None, "loss_curve": curve,
            "wall_seconds": round(time.monotonic() - start, 3), **_peak_memory(rt), "versions": versions()}


def _mean_loss(curve: list[dict], resumed_at: int) -> float | None:
    """Mean loss over the optimizer steps the logged points cover, resumed parts included.

    Each point is the mean since the previous one, or since the resumption step for the first point
    after it (steps between the last log and the checkpoint were never logged). Trainer's own
    train_loss covers only the last ``train()`` call, so it is wrong after a resumption.
    """
    prev, total, covered = 0, 0.0, 0
    for p in curve:
        start = resumed_at if prev < resumed_at < p["step"] else prev
        total, covered, prev = total + p["loss"] * (p["step"] - start), covered + p["step"] - start, p["step"]
    return total / covered if covered else None


def _peak_memory(rt) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if rt.on_cuda:
        peak["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**20, 1)
    return peak
