"""The paper's eight tasks: where their files live and how a row becomes a (prompt, completion) pair.

Prompts copy lm-evaluation-harness's prompts of the same name, and the completion is the correct
choice with a leading space (lm-eval's target delimiter), so fine-tuning, gradient scoring and later
evaluation all see the same text. Each format is a small pure function over one JSON row.

For evaluation a multiple-choice row becomes an ``MCItem`` (lm-eval's contexts and continuations, the
gold index) and a generative row a ``GenItem`` (prompt, reference, label); the training example of a
multiple-choice row is its gold choice, so the two can never drift apart.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from gradpruner.errors import GradPrunerError

KINDS = ("multiple_choice", "generative", "classification")
# Tasks whose files hold no training split are split with this fixed seed by every stage (scoring,
# fine-tuning, evaluation), so a run's --seed never moves an evaluation example into training.
SPLIT_SEED = 0
_JSON_TYPES = {str: "string", bool: "boolean", int: "number", float: "number", list: "array",
               dict: "object", type(None): "null"}


def json_type(value) -> str:
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


class RowError(ValueError):
    """A row that parsed as JSON but does not have the fields a format needs."""


def string_field(row: dict, key: str) -> str:
    # Explicit type checks: an f-string would silently turn null into "None" and train on it.
    value = row[key]  # KeyError -> "lacks the field" in examples.convert_file
    if not isinstance(value, str):
        raise RowError(f"has field {key!r} of type {json_type(value)}, expected a string")
    return value


def _strs(row: dict, key: str) -> list[str]:
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(f"has field {key!r} that is not a list of strings")
    return value


def _index(value, n: int, field: str) -> int:
    # Labels come as ints (piqa, medmcqa) or digit strings (hellaswag); bools are not labels.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise RowError(f"has {field} {value!r}, expected an index from 0 to {n - 1}")
    return value


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as lm-evaluation-harness scores it.

    Choice ``i`` is scored by the log-likelihood of ``continuations[i]`` after ``contexts[i]``. The
    contexts are all equal except for winogrande, where the option fills the blank in the context and
    the continuation (the rest of the sentence) is shared: lm-eval's "partial" evaluation.
    ``choices`` are lm-eval's choice strings (no target delimiter), whose character lengths
    normalise acc_norm.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def example(self) -> Example:
        """The training example of this question: the gold choice after its context."""
        return Example(self.contexts[self.gold], self.continuations[self.gold])


@dataclass(frozen=True)
class GenItem:
    """One generative question: the prompt, the reference text and (for classification) its label."""

    prompt: str
    reference: str
    label: str | None = None


_DELIM = " "  # lm-eval's default target_delimiter


def _mc(context: str, choices: list[str], gold: int) -> MCItem:
    """An item whose context is shared and whose choices are the continuations (the usual case)."""
    return MCItem((context,) * len(choices), tuple(_DELIM + c for c in choices), tuple(choices), gold)


def _arc_choices(row: dict) -> MCItem:
    # lm-eval arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, choices.label.index(answerKey)
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise RowError("lacks the object field 'choices'")
    texts, labels, key = _strs(choices, "text"), _strs(choices, "label"), string_field(row, "answerKey")
    # answerKey is a letter ("A".."E") for most rows but a digit ("1".."5") for some; the labels
    # list always uses the same alphabet, so look it up there rather than converting.
    if len(texts) != len(labels):
        raise RowError("has different numbers of choice texts and labels")
    if key not in labels:
        raise RowError(f"has answerKey {key!r} that is not one of its choice labels {labels}")
    return _mc(f"Question: {string_field(row, 'question')}\nAnswer:", texts, labels.index(key))


def _piqa_choices(row: dict) -> MCItem:
    # lm-eval piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2], label
    choices = [string_field(row, "sol1"), string_field(row, "sol2")]
    return _mc(f"Question: {string_field(row, 'goal')}\nAnswer:", choices, _index(row.get("label"), 2, "label"))


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocess: brackets are WikiHow artefacts ("[title]", "[step]", ...).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_choices(row: dict) -> MCItem:
    # lm-eval hellaswag/utils.py process_docs: query, choices (preprocessed endings), gold = int(label)
    ctx = string_field(row, "ctx_a") + " " + string_field(row, "ctx_b").capitalize()
    endings = _strs(row, "endings")
    gold = _index(row.get("label"), len(endings), "label")
    query = _hellaswag_preprocess(string_field(row, "activity_label") + ": " + ctx)
    return _mc(query, [_hellaswag_preprocess(e) for e in endings], gold)


def _winogrande_choices(row: dict) -> MCItem:
    # lm-eval winogrande/preprocess_winogrande.py: the contexts are the sentence up to the blank with
    # each option filled in, the shared continuation is the rest of the sentence.
    sentence, answer = string_field(row, "sentence"), string_field(row, "answer")
    if "_" not in sentence or answer not in ("1", "2"):
        raise RowError("needs a '_' blank in 'sentence' and an 'answer' of \"1\" or \"2\"")
    idx = sentence.index("_")
    contexts = tuple(sentence[:idx] + string_field(row, k) for k in ("option1", "option2"))
    rest = _DELIM + sentence[idx + 1:].strip()
    return MCItem(contexts, (rest, rest), contexts, int(answer) - 1)


def _medmcqa_choices(row: dict) -> MCItem:
    # lm-eval medmcqa/utils_medmcqa.py doc_to_text; choices A-D; target cop
    options = [string_field(row, k) for k in ("opa", "opb", "opc", "opd")]
    lines = "".join(f"{letter}. {text}\n" for letter, text in zip("ABCD", options))
    prompt = f"Question: {string_field(row, 'question')}\nChoices:\n{lines}Answer:"
    return _mc(prompt, list("ABCD"), _index(row.get("cop"), 4, "cop"))


def _from_choices(to_choices: Callable[[dict], MCItem]) -> Callable[[dict], Example]:
    def to_example(row: dict) -> Example:
        return to_choices(row).example()
    to_example.__name__ = to_choices.__name__.replace("_choices", "")
    return to_example


def _pubmedqa_prompt(row: dict) -> str:
    # lm-eval pubmedqa preprocess: the abstract's sections joined with newlines.
    abstract = "\n".join(_strs(row, "CONTEXTS"))
    return f"Abstract: {abstract}\nQuestion: {string_field(row, 'QUESTION')}\nAnswer:"


def _pubmedqa(row: dict) -> Example:
    # The completion starts with the decision (" yes"/" no"/" maybe", what lm-eval scores) and goes on
    # to the long answer.
    return Example(_pubmedqa_prompt(row), f" {string_field(row, 'final_decision')}. {string_field(row, 'LONG_ANSWER')}")


def _pubmedqa_generation(row: dict) -> GenItem:
    decision = string_field(row, "final_decision").strip().lower()
    if decision not in PUBMEDQA_DECISIONS:
        raise RowError(f"has final_decision {decision!r}, expected one of yes/no/maybe")
    return GenItem(_pubmedqa_prompt(row), string_field(row, "LONG_ANSWER"), decision)


def _after_decision(text: str) -> str:
    # A PubMedQA answer in the training format is "yes. <long answer>": ROUGE-L and BERTScore compare
    # the long answer only (the decision has its own metric).
    return re.sub(r"^\s*(yes|no|maybe)\b[.,:;!]?\s*", "", text, count=1, flags=re.IGNORECASE)


def _fingpt_prompt(row: dict) -> str:
    return f"Instruction: {string_field(row, 'instruction')}\nInput: {string_field(row, 'input')}\nAnswer:"


def _fingpt(row: dict) -> Example:
    return Example(_fingpt_prompt(row), " " + string_field(row, "output"))


def _fingpt_generation(row: dict) -> GenItem:
    label = string_field(row, "output").strip().lower()
    if label not in SENTIMENT_LABELS:
        raise RowError(f"has output {label!r}, expected one of {'/'.join(SENTIMENT_LABELS)}")
    return GenItem(_fingpt_prompt(row), string_field(row, "output"), label)


def _billsum_prompt(row: dict) -> str:
    return f"Summarize the following bill.\n\n{string_field(row, 'text')}\n\nSummary:"


def _billsum(row: dict) -> Example:
    return Example(_billsum_prompt(row), " " + string_field(row, "summary"))


def _billsum_generation(row: dict) -> GenItem:
    return GenItem(_billsum_prompt(row), string_field(row, "summary"))


PUBMEDQA_DECISIONS = ("yes", "no", "maybe")
SENTIMENT_LABELS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: where its files live, how a row becomes an Example, and how it is evaluated.

    With ``eval_files`` empty the task has a single file set that is split deterministically
    (``split_indices``) into train and eval parts by the ``seed`` given to ``load_task``.
    Multiple-choice tasks set ``to_choices`` (scored by log-likelihood like lm-evaluation-harness);
    the others set ``to_generation`` (greedy generation of at most ``max_new_tokens`` tokens, cut at
    the first of ``stop``). ``metric`` is the primary metric and ``metrics`` all that are reported
    (names in ``gradpruner.evaluation.metrics.METRICS``); ``labels`` are the answer words of label metrics.
    """

    name: str
    kind: str  # one of KINDS
    to_example: Callable[[dict], Example]
    train_files: tuple[str, ...]  # relative to the data dir
    eval_files: tuple[str, ...] = ()
    eval_fraction: float = 0.2
    to_choices: Callable[[dict], MCItem] | None = None
    to_generation: Callable[[dict], GenItem] | None = None
    metric: str = "acc"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    labels: tuple[str, ...] = ()
    answer_text: Callable[[str], str] | None = None  # the part of a generation compared with the reference
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    @property
    def split(self) -> str:
        if self.eval_files:
            return "official"
        eval_pct = round(100 * self.eval_fraction)
        return f"deterministic {100 - eval_pct}/{eval_pct}, seed"


def _mc_task(name: str, to_choices, train_files, eval_files=(), metrics=("acc", "acc_norm")) -> TaskSpec:
    return TaskSpec(name, "multiple_choice", _from_choices(to_choices), train_files, eval_files,
                    to_choices=to_choices, metric="acc", metrics=metrics)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _mc_task("arc_easy", _arc_choices, ("arc_easy/train.jsonl",), ("arc_easy/validation.jsonl",)),
        # One file each, no training split of its own: split by split_indices.
        _mc_task("piqa", _piqa_choices, ("piqa/validation_part.jsonl",)),
        _mc_task("hellaswag", _hellaswag_choices, ("hellaswag/validation_part.jsonl",)),
        # lm-eval reports acc only for winogrande (its "choices" are the two filled-in contexts).
        _mc_task("winogrande", _winogrande_choices, ("winogrande/winogrande_xl_validation.jsonl",),
                 metrics=("acc",)),
        _mc_task("medmcqa", _medmcqa_choices, ("medmcqa/validation.jsonl",)),
        TaskSpec("pubmedqa", "classification", _pubmedqa,
                 ("pubmedqa/pqa_labeled_trainval.jsonl",), ("pubmedqa/pqa_labeled_test.jsonl",),
                 to_generation=_pubmedqa_generation, metric="rouge_bertscore",
                 metrics=("rouge_bertscore", "rouge_l", "bertscore", "decision_acc"),
                 labels=PUBMEDQA_DECISIONS, answer_text=_after_decision, max_new_tokens=128, stop=("\n\n",)),
        TaskSpec("fingpt_sentiment", "classification", _fingpt,
                 ("fingpt_sentiment/fpb_train.jsonl", "fingpt_sentiment/tfns_train.jsonl"),
                 ("fingpt_sentiment/fpb_test.jsonl", "fingpt_sentiment/tfns_test.jsonl"),
                 to_generation=_fingpt_generation, metric="label_acc", metrics=("label_acc",),
                 labels=SENTIMENT_LABELS, max_new_tokens=8, stop=("\n",)),
        TaskSpec("billsum", "generative", _billsum, ("billsum/us_train_sample100.jsonl",),
                 to_generation=_billsum_generation, metric="rouge_bertscore",
                 metrics=("rouge_bertscore", "rouge_l", "bertscore"), max_new_tokens=256),
    )
}


@dataclass(frozen=True)
class HubSource:
    """Where a user with the network finds a task on the Hugging Face Hub.

    ``eval`` None means the Hub has no held-out split we use, so ``train`` is split deterministically;
    ``adapt`` renames a Hub row's fields to those of the JSONL files, so one converter serves both.
    """

    path: str
    name: str | None = None
    train: str = "train"
    eval: str | None = None
    adapt: Callable[[dict], dict] | None = None


def _pubmedqa_from_hub(row: dict) -> dict:
    return {"QUESTION": row["question"], "CONTEXTS": list(row["context"]["contexts"]),
            "LONG_ANSWER": row["long_answer"], "final_decision": row["final_decision"]}


HUB_SOURCES: dict[str, HubSource] = {
    "arc_easy": HubSource("allenai/ai2_arc", "ARC-Easy", "train", "validation"),
    "piqa": HubSource("ybisk/piqa", None, "train", "validation"),
    "hellaswag": HubSource("Rowan/hellaswag", None, "train", "validation"),
    "winogrande": HubSource("allenai/winogrande", "winogrande_xl", "train", "validation"),
    "medmcqa": HubSource("openlifescienceai/medmcqa", None, "train", "validation"),
    "pubmedqa": HubSource("qiaojin/PubMedQA", "pqa_labeled", "train", None, _pubmedqa_from_hub),
    "fingpt_sentiment": HubSource("FinGPT/fingpt-sentiment-train", None, "train", None),
    "billsum": HubSource("FiscalNote/billsum", None, "train", "test"),
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
