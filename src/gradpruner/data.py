"""Training data: the offline task files, generic JSONL, tokenisation and padding.

Every example is a (prompt, completion) pair; the loss is computed on the completion only.  Task
prompts copy lm-evaluation-harness's prompts of the same name, and the completion is the correct
choice with a leading space (lm-eval's target delimiter), so fine-tuning, gradient scoring and later
evaluation all see the same text.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GradPrunerError, did_you_mean, lookup

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
KINDS = ("multiple_choice", "generative", "classification")
IGNORE_INDEX = -100  # label value torch's cross-entropy skips
_MAX_REPORTED = 10  # bad lines listed one by one before "and N more"
_DIR_HINT = "pass the folder holding the offline datasets with --data-dir (or set GRADPRUNER_DATA_DIR)"
_GENERIC_FORMAT = 'each line must be {"prompt": "...", "completion": "..."} or {"text": "..."}'


@dataclass(frozen=True)
class Example:
    """One training example.

    ``prompt`` is the conditioning text (no loss); ``completion`` is the text the loss is computed on.
    Loaders never return an empty completion; ``prompt`` is "" for ``{"text": ...}`` lines, whose whole
    text is the completion.
    """

    prompt: str
    completion: str


class _RowError(ValueError):
    """A row that parsed as JSON but does not have the fields a format needs."""


# ----------------------------------------------------------------------------------------- tasks
def _str(row: dict, key: str) -> str:
    # Explicit type checks: an f-string would silently turn null into "None" and train on it.
    value = row[key]  # KeyError -> "lacks the field" in _convert_file
    if not isinstance(value, str):
        raise _RowError(f"has field {key!r} of type {_json_type(value)}, expected a string")
    return value


def _strs(row: dict, key: str) -> list[str]:
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RowError(f"has field {key!r} that is not a list of strings")
    return value


def _index(value, n: int, field: str) -> int:
    # Labels come as ints (piqa, medmcqa) or digit strings (hellaswag); bools are not labels.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise _RowError(f"has {field} {value!r}, expected an index from 0 to {n - 1}")
    return value


def _arc(row: dict) -> Example:
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise _RowError("lacks the object field 'choices'")
    texts, labels, key = _strs(choices, "text"), _strs(choices, "label"), _str(row, "answerKey")
    # answerKey is a letter ("A".."E") for most rows but a digit ("1".."5") for some; the labels
    # list always uses the same alphabet, so look it up there rather than converting.
    if len(texts) != len(labels):
        raise _RowError("has different numbers of choice texts and labels")
    if key not in labels:
        raise _RowError(f"has answerKey {key!r} that is not one of its choice labels {labels}")
    return Example(f"Question: {_str(row, 'question')}\nAnswer:", " " + texts[labels.index(key)])


def _piqa(row: dict) -> Example:
    sol = (_str(row, "sol1"), _str(row, "sol2"))[_index(row.get("label"), 2, "label")]
    return Example(f"Question: {_str(row, 'goal')}\nAnswer:", " " + sol)


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocess: brackets are WikiHow artefacts ("[title]", "[step]", ...).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Example:
    ctx = _str(row, "ctx_a") + " " + _str(row, "ctx_b").capitalize()
    endings = _strs(row, "endings")
    ending = endings[_index(row.get("label"), len(endings), "label")]
    prompt = _hellaswag_preprocess(_str(row, "activity_label") + ": " + ctx)
    return Example(prompt, " " + _hellaswag_preprocess(ending))


def _winogrande(row: dict) -> Example:
    # lm-eval's "partial" scoring: the option fills the blank in the context and the loss is on the
    # rest of the sentence, which is the same for both options.
    sentence, answer = _str(row, "sentence"), _str(row, "answer")
    if "_" not in sentence or answer not in ("1", "2"):
        raise _RowError("needs a '_' blank in 'sentence' and an 'answer' of \"1\" or \"2\"")
    idx = sentence.index("_")
    option = _str(row, "option1") if answer == "1" else _str(row, "option2")
    return Example(sentence[:idx] + option, " " + sentence[idx + 1:].strip())


def _medmcqa(row: dict) -> Example:
    options = [_str(row, k) for k in ("opa", "opb", "opc", "opd")]
    lines = "".join(f"{letter}. {text}\n" for letter, text in zip("ABCD", options))
    prompt = f"Question: {_str(row, 'question')}\nChoices:\n{lines}Answer:"
    return Example(prompt, " " + "ABCD"[_index(row.get("cop"), 4, "cop")])


def _pubmedqa(row: dict) -> Example:
    # lm-eval joins the abstract's sections with newlines; the completion starts with the decision
    # (" yes"/" no"/" maybe", what lm-eval scores) and goes on to the long answer.
    abstract = "\n".join(_strs(row, "CONTEXTS"))
    prompt = f"Abstract: {abstract}\nQuestion: {_str(row, 'QUESTION')}\nAnswer:"
    return Example(prompt, f" {_str(row, 'final_decision')}. {_str(row, 'LONG_ANSWER')}")


def _fingpt(row: dict) -> Example:
    prompt = f"Instruction: {_str(row, 'instruction')}\nInput: {_str(row, 'input')}\nAnswer:"
    return Example(prompt, " " + _str(row, "output"))


def _billsum(row: dict) -> Example:
    prompt = f"Summarize the following bill.\n\n{_str(row, 'text')}\n\nSummary:"
    return Example(prompt, " " + _str(row, "summary"))


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: where its files live, how a row becomes an Example, and its kind.

    With ``eval_files`` empty the task has a single file set that is split deterministically
    (``split_indices``) into train and eval parts by the ``seed`` given to ``load_task``.
    """

    name: str
    kind: str  # one of KINDS
    to_example: Callable[[dict], Example]
    train_files: tuple[str, ...]  # relative to the data dir
    eval_files: tuple[str, ...] = ()
    eval_fraction: float = 0.2

    @property
    def split(self) -> str:
        if self.eval_files:
            return "official"
        eval_pct = round(100 * self.eval_fraction)
        return f"deterministic {100 - eval_pct}/{eval_pct}, seed"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "multiple_choice", _arc,
                 ("arc_easy/train.jsonl",), ("arc_easy/validation.jsonl",)),
        # No training split offline: one file, split by split_indices.
        TaskSpec("piqa", "multiple_choice", _piqa, ("piqa/validation_part.jsonl",)),
        TaskSpec("hellaswag", "multiple_choice", _hellaswag, ("hellaswag/validation_part.jsonl",)),
        TaskSpec("winogrande", "multiple_choice", _winogrande,
                 ("winogrande/winogrande_xl_validation.jsonl",)),
        TaskSpec("medmcqa", "multiple_choice", _medmcqa, ("medmcqa/validation.jsonl",)),
        TaskSpec("pubmedqa", "classification", _pubmedqa,
                 ("pubmedqa/pqa_labeled_trainval.jsonl",), ("pubmedqa/pqa_labeled_test.jsonl",)),
        TaskSpec("fingpt_sentiment", "classification", _fingpt,
                 ("fingpt_sentiment/fpb_train.jsonl", "fingpt_sentiment/tfns_train.jsonl"),
                 ("fingpt_sentiment/fpb_test.jsonl", "fingpt_sentiment/tfns_test.jsonl")),
        TaskSpec("billsum", "generative", _billsum, ("billsum/us_train_sample100.jsonl",)),
    )
}


def split_indices(n: int, seed: int, eval_fraction: float = 0.2) -> tuple[list[int], list[int]]:
    """Disjoint (train, eval) index lists covering ``range(n)``, each in ascending order.

    The same (n, seed, eval_fraction) always gives the same split.  When n >= 2 both parts are
    non-empty, so a tiny file still has something to evaluate on.
    """
    if not 0 < eval_fraction < 1:
        raise GradPrunerError(f"eval_fraction {eval_fraction!r} must be between 0 and 1 (exclusive).")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n >= 2 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


# ------------------------------------------------------------------------------------ reading
_JSON_TYPES = {str: "string", bool: "boolean", int: "number", float: "number", list: "array",
               dict: "object", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _read_jsonl_rows(path: Path, problems: list[str]) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for every well-formed non-blank line.

    Bad lines are appended to ``problems`` (one sentence each) instead of raised, so a user sees
    every mistake in one go.  Lines are read as bytes and decoded one by one, which lets a
    non-UTF-8 byte be pinned to its line; nothing from a line is echoed, so huge lines stay cheap.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                row, why = _parse_line(raw)
                if why:
                    problems.append(f"{path} line {lineno} {why}.")
                else:
                    yield lineno, row


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(object, None) for a JSON object line, else (None, what is wrong and what to do)."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"is not valid UTF-8 (bad byte at column {e.start + 1}); re-save the file as UTF-8"
    except RecursionError:  # e.g. "[[[[..." a hundred thousand deep
        return None, "nests too deeply to be read; flatten it"
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line"
    if not isinstance(row, dict):
        return None, f"is a JSON {_json_type(row)}, not an object; write one JSON object per line"
    return row, None


def _convert_file(path: Path, convert: Callable[[dict], Example], fix: str) -> list[Example]:
    """Read ``path`` and convert every row, raising one error that lists all bad lines."""
    problems: list[str] = []
    examples: list[Example] = []
    for lineno, row in _read_jsonl_rows(path, problems):
        try:
            example = convert(row)
            if not example.completion.strip():
                raise _RowError("has an empty completion")
        except (ValueError, LookupError, TypeError, AttributeError) as e:
            why = f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            problems.append(f"{path} line {lineno} {why}; {fix}.")
            continue
        examples.append(example)
    if problems:
        _raise_problems(path, problems)
    if not examples:
        raise GradPrunerError(f"{path} has no examples (it is empty or blank); {fix}.")
    return examples


def _raise_problems(path: Path, problems: list[str]):
    shown = problems[:_MAX_REPORTED]
    if len(problems) > _MAX_REPORTED:
        shown.append(f"... and {len(problems) - _MAX_REPORTED} more bad lines in {path}.")
    raise GradPrunerError(*shown)


def _generic_row(row: dict) -> Example:
    if "prompt" in row or "completion" in row:
        if "text" in row:
            raise _RowError("has both 'text' and 'prompt'/'completion' keys")
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise _RowError(f"lacks the key {missing[0]!r}")
        return Example(_str(row, "prompt"), _str(row, "completion"))
    if "text" in row:
        text = _str(row, "text")
        if not text.strip():
            raise _RowError("has an empty 'text'")
        return Example("", text)
    raise _RowError("has neither 'prompt'/'completion' nor 'text' keys")


def _require_file(path: Path, what: str, hint: str) -> None:
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise GradPrunerError(f"{what} {path} {kind}; {hint}.")


def load_jsonl(path: str | Path) -> list[Example]:
    """Load a generic JSONL file: every non-blank line is {"prompt", "completion"} or {"text"}.

    Extra keys are ignored.  All malformed lines are reported together in one GradPrunerError.
    """
    path = Path(path)
    _require_file(path, "Data file", "pass the path of an existing JSONL file with --data")
    return _convert_file(path, _generic_row, _GENERIC_FORMAT)


# ------------------------------------------------------------------------------------ loading
def default_data_dir() -> Path | None:
    """$GRADPRUNER_DATA_DIR if set, else the first existing ../shared/data (from cwd, then repo)."""
    env = os.environ.get("GRADPRUNER_DATA_DIR")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]  # src/gradpruner/data.py -> repo
    for candidate in (Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise did_you_mean(split, SPLITS, "split")


def load_task(name: str, split: str = "train", data_dir: str | Path | None = None,
              seed: int = 0) -> list[Example]:
    """The ``split`` ("train" or "eval") of a registered task, read from ``data_dir``.

    ``seed`` only matters for tasks without an official split (``TaskSpec.split`` says which):
    train and eval are then disjoint parts of one file, and the same seed always gives the same parts.
    """
    spec: TaskSpec = lookup(TASKS, name, "task")
    _check_split(split)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        raise GradPrunerError("No data directory was found (looked for ../shared/data next to the "
                              "working directory and the repository); " + _DIR_HINT + ".")
    if not root.is_dir():
        raise GradPrunerError(f"Data directory {root} does not exist; {_DIR_HINT}.")
    files = spec.eval_files if (split == "eval" and spec.eval_files) else spec.train_files
    fix = f"the {name} file should hold the original dataset rows, one JSON object per line"
    examples: list[Example] = []
    for rel in files:
        _require_file(root / rel, f"Task file for {name!r}", _DIR_HINT)
        examples.extend(_convert_file(root / rel, spec.to_example, fix))
    if spec.eval_files:
        return examples
    train_idx, eval_idx = split_indices(len(examples), seed, spec.eval_fraction)
    return [examples[i] for i in (train_idx if split == "train" else eval_idx)]


def load_examples(task: str | None = None, data: str | Path | None = None, split: str = "train",
                  data_dir: str | Path | None = None, seed: int = 0) -> list[Example]:
    """Examples from exactly one of a registered ``task`` or a generic JSONL ``data`` file.

    For a ``data`` file both splits return every line: the file has no split of its own, so the
    caller decides whether to hold some out (e.g. with ``split_indices``) or to pass a second file.
    """
    if (task is None) == (data is None):
        raise GradPrunerError("Give exactly one of a task name (--task) or a JSONL file (--data).")
    _check_split(split)
    if task is not None:
        return load_task(task, split, data_dir=data_dir, seed=seed)
    return load_jsonl(data)


# ------------------------------------------------------------------------------- tokenisation
def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts *before* text with add_special_tokens=True (usually [BOS] or []).

    Only the prefix is kept: a tokenizer that also appends EOS/SEP would otherwise put it between
    prompt and completion.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if with_special[:1] == [bos] and bos is not None else []


def _fit(prefix: list[int], body: list[int], completion: list[int],
         max_length: int) -> tuple[list[int], list[int]]:
    """Prompt and completion ids cut to at most ``max_length`` together.

    The completion carries the loss, so the prompt gives way first, losing its left end (the text
    nearest the completion matters most) but keeping BOS.  A completion that alone is too long is cut
    on the right, leaving room for BOS.
    """
    cap = max_length - len(prefix) if max_length > len(prefix) else max_length
    completion = completion[:cap]
    room = max_length - len(completion)
    keep = room - len(prefix)
    if keep <= 0:
        return prefix[:room], completion
    return prefix + body[len(body) - min(keep, len(body)):], completion


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: long prompts are expected here (we truncate ourselves), so skip the warning.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize(examples: list[Example], tokenizer, max_length: int = 512) -> list[dict]:
    """{"input_ids", "labels"} per example for causal-LM training; labels are -100 on the prompt.

    The prompt gets the tokenizer's BOS (if it adds one) and the completion gets EOS, so the model
    learns where an answer stops.  Examples left without a loss token are dropped and counted in a
    log warning; if none remain a GradPrunerError is raised.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise GradPrunerError(f"max_length {max_length!r} must be a positive integer; pass e.g. 512.")
    prefix = _special_prefix(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    suffix = [eos] if eos is not None else []
    prompts = _ids(tokenizer, [ex.prompt for ex in examples])
    completions = _ids(tokenizer, [ex.completion for ex in examples])
    out, dropped = [], 0
    for body, comp in zip(prompts, completions):
        prompt_ids, comp_ids = _fit(prefix, list(body), list(comp) + suffix, max_length)
        if not comp_ids:
            dropped += 1
            continue
        out.append({"input_ids": prompt_ids + comp_ids,
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + comp_ids})
    if dropped:
        log.warning("Dropped %d of %d examples that had no completion tokens left to train on.",
                    dropped, len(examples))
    if not out:
        raise GradPrunerError(f"None of the {len(examples)} examples has a completion token to train "
                              "on; check that completions are non-empty and max_length is large enough.")
    return out


class PadCollator:
    """Batch tokenized features: right-pad input_ids with the pad id, labels with -100.

    Usable as ``collate_fn`` of a torch DataLoader or ``data_collator`` of a transformers Trainer.
    """

    def __init__(self, pad_token_id: int):
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
            raise GradPrunerError(f"pad_token_id {pad_token_id!r} is not a token id; set the "
                                  "tokenizer's pad token (e.g. to its EOS token) before batching.")
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * (width - n))
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * (width - n))
            mask.append([1] * n + [0] * (width - n))
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long)}
