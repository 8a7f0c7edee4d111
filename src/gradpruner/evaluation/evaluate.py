"""Evaluation: a task's metric on held-out data, or loss and exact match on a prompt/completion file.

* Multiple-choice tasks (arc_easy, piqa, hellaswag, winogrande, medmcqa) are scored like
  lm-evaluation-harness zero-shot: the log-likelihood of each choice after lm-eval's prompt
  (``mc_scoring.score_choices``), giving ``acc`` and ``acc_norm``.
* Generative tasks (pubmedqa, billsum, fingpt_sentiment) generate greedily and score the text
  (``metrics``): ½(ROUGE-L + BERTScore) for PubMedQA and BillSum, plus PubMedQA's decision accuracy,
  and label accuracy for FinGPT sentiment.
* A generic JSONL file of {"prompt", "completion"} lines gives ``loss`` (mean cross-entropy per
  completion token, EOS included, as in training) and ``exact_match`` (the share of examples whose
  completion, EOS included, greedy decoding reproduces token for token, i.e. the model would
  generate exactly the completion and stop).

Evaluation never uses examples that were trained on: a task's eval items that also occur in its
training split are left out (and counted), and a user's training file that overlaps the evaluation
data is an error.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from gradpruner.data.examples import (
    check_split,
    convert_file,
    fit_to_length,
    load_jsonl,
    load_task,
    load_task_rows,
    require_file,
    special_prefix,
    task_fix,
    token_ids,
    tokenize,
)
from gradpruner.data.tasks import TASKS, Example, GenItem, MCItem, TaskSpec
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.evaluation import metrics as M
from gradpruner.evaluation.config import EvalConfig
from gradpruner.evaluation.loglik import model_max_length, score_choices
from gradpruner.util import options

PROMPTS = "lm-evaluation-harness prompts of the same name, zero-shot, target delimiter ' '"


# ----------------------------------------------------------------------------- token statistics
@torch.no_grad()
def completion_stats(model, tokenizer, features: list[dict], batch_size: int = 8, progress: bool = True,
                     desc: str = "completion loss") -> list[tuple[float, int, bool]]:
    """(summed log-probability, token count, greedy reproduces it) of each feature's labelled tokens.

    Features are ``data.tokenize`` output. Batches are left-padded so that every completion ends in
    the last column, and logits are computed only for the last (longest completion + 1) positions.
    """
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(features)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        batch = [features[i] for i in order[start:start + batch_size]]
        width = max(len(f["input_ids"]) for f in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, f in enumerate(batch):
            n = len(f["input_ids"])
            ids[r, width - n:], labels[r, width - n:] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            mask[r, width - n:] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        keep = min(width, int((labels != -100).sum(-1).max()) + 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                       logits_to_keep=keep).logits[:, -keep:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = labels[:, width - keep + 1:]
        valid = target != -100
        picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
        hit = (logp.argmax(-1) == target) | ~valid
        for r, i in enumerate(order[start:start + batch_size]):
            out[i] = (float((picked[r] * valid[r]).sum()), int(valid[r].sum()), bool(hit[r].all()))
    return out


def heldout_loss(model, tokenizer, features: list[dict], batch_size: int = 8, desc: str = "held-out loss") -> float:
    """Mean cross-entropy per completion token over ``features`` (tokenised examples with labels)."""
    stats = completion_stats(model, tokenizer, features, batch_size, desc=desc)
    return M.loss([s[0] for s in stats], [s[1] for s in stats])


# ---------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                     stop: tuple[str, ...] = (), progress: bool = True, desc: str = "generating",
                     max_length: int | None = None) -> list[str]:
    """Greedy continuation of each prompt (new text only), cut before the first of ``stop``.

    Prompts are tokenised as in training (BOS if the tokenizer adds one, no EOS), left-truncated to
    fit ``max_length`` tokens (capped at the model's context length, also the default) with
    ``max_new_tokens`` to spare, and run in left-padded batches with the KV cache.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    model.eval()
    device = next(model.parameters()).device
    limit = model_max_length(model, tokenizer, max_length)
    room = limit - max_new_tokens
    if room < 1:
        raise GradPrunerError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in --max-length {limit} "
                              "(at most the model's context); choose fewer new tokens or a larger --max-length.")
    prefix = special_prefix(tokenizer)
    inputs = [fit_to_length(prefix, list(body), [], room)[0] for body in token_ids(tokenizer, prompts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    texts = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(inputs[i]))
    bar = tqdm(total=len(prompts), desc=desc, unit="q", leave=False, disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(inputs[i]) for i in batch)
        ids = torch.tensor([[pad] * (width - len(inputs[i])) + inputs[i] for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(inputs[i])) + [1] * len(inputs[i]) for i in batch], device=device)
        stopping = StoppingCriteriaList([_StopInNewText(tokenizer, stop, width)] if stop else [])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=stopping)
        for i, row in zip(batch, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            texts[i] = text
        bar.update(len(batch))
    bar.close()
    return texts


class _StopInNewText(StoppingCriteria):
    """Stops a row once its generated text (not the prompt, unlike ``stop_strings``) holds a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, stop, start

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


# ----------------------------------------------------------------------------------- the guard
def _key(ex: Example) -> tuple[str, str]:
    return " ".join(ex.prompt.split()), " ".join(ex.completion.split())


def overlapping(train_examples: list[Example], eval_examples: list[Example]) -> list[int]:
    """Indices of eval examples whose (prompt, completion), whitespace-normalised, is also a training one."""
    seen = {_key(ex) for ex in train_examples}
    return [i for i, ex in enumerate(eval_examples) if _key(ex) in seen]


def check_disjoint(train_examples: list[Example], eval_examples: list[Example], what: str) -> None:
    """Raise if any evaluation example of ``what`` is also a training example."""
    hits = overlapping(train_examples, eval_examples)
    if hits:
        raise GradPrunerError(
            f"{len(hits)} of the {len(eval_examples)} evaluation examples of {what} also appear in the training "
            f"data (the first is evaluation example {hits[0] + 1}); evaluate on held-out examples, or remove "
            "the overlap from one of the two files.")


# ------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class EvalRow:
    item: MCItem | GenItem
    example: Example  # the row's training example, for the overlap guard


def _eval_converter(spec: TaskSpec):
    make = spec.to_choices or spec.to_generation
    return lambda row: EvalRow(make(row), spec.to_example(row))


def _load(task, data, split, data_dir, seed, guard) -> tuple[list, int, str]:
    """(rows, number left out as seen in training, where they came from)."""
    if task is None:
        return load_jsonl(data), 0, str(data)
    spec: TaskSpec = lookup(TASKS, task, "task")
    if data is not None:  # the user's own file of this task's rows
        path = Path(data)
        require_file(path, "Data file", f"pass a JSONL file of {task} rows with --data")
        return convert_file(path, _eval_converter(spec), task_fix(task)), 0, str(path)
    if split == "train" and guard:
        raise GradPrunerError(f"Evaluating on the train split of {task} measures training data, not held-out "
                              "performance; use the eval split (or turn the guard off in the API).")
    rows = load_task_rows(task, split, _eval_converter(spec), data_dir, seed)
    source = f"{task} {split} split ({spec.split}{f' {seed}' if not spec.eval_files else ''})"
    if split != "eval" or not guard:
        return rows, 0, source
    seen = set(overlapping(load_task(task, "train", data_dir, seed), [r.example for r in rows]))
    return [r for i, r in enumerate(rows) if i not in seen], len(seen), source


def heldout_examples(task: str | None = None, data: str | os.PathLike | None = None,
                     data_dir: str | os.PathLike | None = None, seed: int = 0) -> list[Example]:
    """The held-out items ``evaluate`` scores (a task's eval split without the items also in its training
    split, or every line of a prompt/completion file), as training examples in the same order: their
    completion loss measures the same items as the metric, and their count sizes a validation slice."""
    rows = _load(task, data if task is None else None, "eval", data_dir, seed, True)[0]
    return [r.example if isinstance(r, EvalRow) else r for r in rows]


def _check_args(task, data, split, limit, batch_size, max_new_tokens, metric, spec, offset=0, max_length=None) -> str:
    """The primary metric's name, after checking every argument a user can get wrong."""
    if task is None and data is None:
        raise GradPrunerError("Give a task name (--task) or a JSONL file (--data) to evaluate on.")
    check_split(split)
    for name, value in (("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("max_length", max_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise GradPrunerError(f"{name} {value!r} must be a positive whole number.")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise GradPrunerError(f"offset {offset!r} must be a whole number ≥ 0.")
    available = spec.metrics if spec else ("loss", "exact_match")
    chosen = metric or (spec.metric if spec else "loss")
    M.get_metric(chosen)  # an unknown name: did-you-mean over all metrics
    if chosen not in available:
        what = f"task {spec.name}" if spec else "a prompt/completion file"
        raise GradPrunerError(f"Metric {chosen!r} does not apply to {what}; choose one of: {', '.join(available)}.")
    return chosen


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------- evaluate
def evaluate(model, tokenizer=None, task: str | None = None, data: str | os.PathLike | None = None,
             split: str = "eval", data_dir: str | os.PathLike | None = None, seed: int = 0,
             config: EvalConfig | None = None, train_data: str | os.PathLike | None = None,
             train_examples_guard: bool = True, details: bool = False, item_scores: bool = False, progress: bool = True,
             out: str | os.PathLike | None = None, overwrite: bool = False, runtime=None, **settings) -> dict:
    """Evaluate ``model`` on a task's held-out split, a file of a task's rows, or a prompt/completion file.

    ``model`` is a loaded causal LM (then ``tokenizer`` is required) or anything ``resolve_model``
    accepts. ``task`` alone: its ``split`` (default "eval"); ``task`` and ``data``: every row of that
    file in the task's original format; ``data`` alone: a generic prompt/completion JSONL file.
    ``offset`` skips the first N items and ``limit`` then keeps K, so disjoint slices of one held-out
    split serve as validation (for choosing) and test (for reporting). ``metric`` picks the headline metric (default: the task's).
    ``encoder`` is the BERTScore encoder folder (default: $GRADPRUNER_BERTSCORE_ENCODER, else the
    packaged MiniLM). ``train_data`` is the user's training JSONL: any overlap is an error. With
    ``train_examples_guard`` (default) a task's eval items that are also in its training split are
    left out and counted, and evaluating on a train split is refused. ``details`` adds per-item
    log-likelihoods or generations. ``item_scores`` adds the headline metric of every item, by item id,
    for paired comparisons (``stats.paired_scores``; docs/evaluation.md). ``out`` (checked before any work) receives the result as JSON.
    ``runtime`` (a ``RuntimeConfig``, a resolved ``Runtime`` or None for auto: the GPU in bfloat16 where
    there is one) says where and in which precision a model named by path is loaded; a loaded model is
    evaluated where it is. The result's ``runtime`` says the device and dtype that were used.

    The settings (``limit``, ``offset``, ``batch_size``, ``metric``, ``max_new_tokens``, ``max_length``,
    ``encoder``) are the fields of ``EvalConfig``: pass ``config`` or any of them as keywords.

    Returns {"task", "metric", "value", "n", "metrics", ...} (see docs/commands.md).
    """
    cfg = options.settings(EvalConfig, config, settings, "evaluation setting")
    limit, offset, batch_size, metric = cfg.limit, cfg.offset, cfg.batch_size, cfg.metric
    max_new_tokens, max_length, encoder = cfg.max_new_tokens, cfg.max_length, cfg.encoder
    from gradpruner.models.loading import (
        check_model,
        load_model,
        load_tokenizer,
        resolve_model,
    )
    from gradpruner.models.runtime import describe
    from gradpruner.models.runtime import resolve as resolve_runtime
    from gradpruner.util.atomic import check_output

    with Collect() as check:  # every problem with the inputs, in one message, before any work
        spec: TaskSpec | None = check(lookup, TASKS, task, "task") if task is not None else None
        chosen = check(_check_args, task, data, split, limit, batch_size, max_new_tokens, metric, spec, offset,
                       max_length) \
            if task is None or spec is not None else None
        if out is not None:
            check(check_output, out, overwrite)
        by_name = isinstance(model, (str, os.PathLike))
        rt = check(resolve_runtime, runtime) if by_name else None
        resolved = check(resolve_model, model) if by_name else None
        if resolved is not None and rt is not None:
            check(check_model, resolved, rt.trust_remote_code, rt.allow_pickle)
        elif not by_name and tokenizer is None:
            check.problems.append("evaluate() got a loaded model but no tokenizer; pass the tokenizer too.")
        has_rows = spec is not None or (task is None and data is not None)
        rows, excluded, source = (check(_load, task, data, split, data_dir, seed, train_examples_guard)
                                  if has_rows else None) or (None, 0, "")
        train = check(load_jsonl, train_data) if train_data is not None else None
    model_name = str(model) if by_name else getattr(model.config, "_name_or_path", "")
    if train is not None:
        check_disjoint(train, [r.example if isinstance(r, EvalRow) else r for r in rows], source)
    if offset and offset >= len(rows):
        raise GradPrunerError(f"offset {offset} skips all {len(rows)} evaluation items of {source}; use a smaller offset.")
    rows = rows[offset:]
    rows = rows[:limit] if limit else rows
    if by_name:
        model = load_model(resolved, rt)
        tokenizer = tokenizer or load_tokenizer(resolved, trust_remote_code=rt.trust_remote_code)

    t0 = time.perf_counter()
    result = {"task": task or "jsonl", "data": str(data) if data is not None else None, "source": source,
              "model": model_name, "metric": chosen, "higher_is_better": M.HIGHER_IS_BETTER[chosen],
              "runtime": rt.record() if by_name else describe(model)}
    if spec is None:
        per_item, extra = _eval_file(model, tokenizer, rows, batch_size, max_length, progress)
    elif spec.to_choices:
        per_item, extra = _eval_choices(model, tokenizer, spec, rows, batch_size, progress, max_length)
    else:
        per_item, extra = _eval_generation(model, tokenizer, spec, rows, batch_size, encoder,
                                           max_new_tokens or spec.max_new_tokens, progress, max_length)
    seconds = time.perf_counter() - t0
    values = {name: (_mean(v) if name != "loss" else v) for name, v in per_item.items()}
    result.update({"value": values[chosen], "n": len(rows), "metrics": values, "split": split if data is None else "file",
                   "seed": seed, "limit": limit, "offset": offset, "excluded_overlap": excluded, "batch_size": batch_size,
                   "seconds": round(seconds, 3), "seconds_per_item": round(seconds / max(len(rows), 1), 4)})
    result.update({k: v for k, v in extra.items() if k != "details"})
    if details:
        result["details"] = extra.get("details", [])
    if item_scores and isinstance(per_item[chosen], list):  # loss is pooled over tokens: no per-item value
        result["item_scores"] = _item_scores(chosen, per_item[chosen], rows, offset)
    if out is not None:
        save_result(result, out, overwrite=True)
    return result


def _item_scores(metric: str, values: list[float], rows: list, offset: int) -> dict:
    """One number per item: its id (position in the held-out items after the overlap guard, so equal
    offsets and limits give equal ids) and its score, with a digest of the items' text to check that two
    results scored the same items."""
    keys = [_key(r.example if isinstance(r, EvalRow) else r) for r in rows]
    digest = hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"metric": metric, "ids": list(range(offset, offset + len(values))),
            "values": [round(float(v), 6) for v in values], "digest": digest}


def _eval_choices(model, tokenizer, spec, rows, batch_size, progress, max_length=None):
    items = [r.item for r in rows]
    lls = score_choices(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=spec.name,
                        max_length=max_length)
    per_item = {name: [M.METRICS[name](ll, it) for ll, it in zip(lls, items)] for name in spec.metrics}
    details = [{"gold": it.gold, "loglik": ll} for it, ll in zip(items, lls)]
    return per_item, {"prompts": PROMPTS, "details": details}


def _eval_generation(model, tokenizer, spec, rows, batch_size, encoder, max_new_tokens, progress, max_length=None):
    items: list[GenItem] = [r.item for r in rows]
    # Load the encoder before generating, so a missing one fails fast.
    scorer = M.get_scorer(encoder) if {"bertscore", "rouge_bertscore"} & set(spec.metrics) else None
    description = scorer.description if scorer else None
    preds = generate_answers(model, tokenizer, [it.prompt for it in items], max_new_tokens, batch_size,
                             spec.stop, progress, desc=spec.name, max_length=max_length)
    per_item = M.generation_scores(spec.metrics, preds, [it.reference for it in items],
                                   [it.label for it in items], spec.labels, encoder, spec.answer_text)
    extra = {"prompts": "gradpruner task prompts (tasks.py), greedy decoding", "max_new_tokens": max_new_tokens,
             "details": [{"prediction": p, "reference": it.reference, "label": it.label} for p, it in zip(preds, items)]}
    if description:
        extra["encoder"] = description
    return per_item, extra


def _eval_file(model, tokenizer, examples, batch_size, max_length, progress):
    features = tokenize(examples, tokenizer, max_length=model_max_length(model, tokenizer, max_length))
    stats = completion_stats(model, tokenizer, features, batch_size, progress, desc="prompt/completion file")
    per_item = {"loss": M.loss([s[0] for s in stats], [s[1] for s in stats]),
                "exact_match": [float(s[2]) for s in stats]}
    return per_item, {"tokens": sum(s[1] for s in stats), "scored_examples": len(stats),
                      "details": [{"logprob": s[0], "tokens": s[1], "greedy_match": s[2]} for s in stats]}


def save_result(result: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``result`` as JSON to ``out`` atomically (refusing to replace a file unless ``overwrite``)."""
    from gradpruner.util.atomic import check_output, write_json

    out = check_output(out, overwrite)
    write_json(out, result)
    return out
