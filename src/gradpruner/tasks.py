"""The paper's eight tasks: where their files live and how a row becomes a (prompt, completion) pair.

Prompts copy lm-evaluation-harness's prompts of the same name, and the completion is the correct
choice with a leading space (lm-eval's target delimiter), so fine-tuning, gradient scoring and later
evaluation all see the same text. Each format is a small pure function over one JSON row.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import GradPrunerError

KINDS = ("multiple_choice", "generative", "classification")
_JSON_TYPES = {str: "string", bool: "boolean", int: "number", float: "number", list: "array",
               dict: "object", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)

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
