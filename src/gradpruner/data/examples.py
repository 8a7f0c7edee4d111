"""Training data: reading task files and generic JSONL, tokenisation and padding.

Every example is a (prompt, completion) pair; the loss is computed on the completion only. The task
formats themselves live in ``tasks.py``. Every malformed line is reported with its file and line
number, all of them in one error.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from gradpruner.errors import GradPrunerError, did_you_mean, lookup

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
IGNORE_INDEX = -100  # label value torch's cross-entropy skips
_MAX_REPORTED = 10  # bad lines listed one by one before "and N more"
# A JSONL line longer than this is refused (with its line number), not read: real examples are far
# shorter (the longest line of the eight tasks' files is 21 kB), and a model reads at most
# --max-length tokens of one anyway. It bounds the memory and time a malformed file can cost.
MAX_LINE_BYTES = 4 * 2**20
_DIR_HINT = ("pass the folder holding the task's files with --data-dir DIR (or set GRADPRUNER_DATA_DIR), "
             "or --data-dir hub to read the task from the Hugging Face Hub")
HUB = "hub"  # --data-dir value that reads tasks from the Hub
DATA_DIR_ENV = "GRADPRUNER_DATA_DIR"
# Files that ship inside the package (see files/README.md), so a fresh install runs the demo task
# with nothing beside it. Same layout as a --data-dir folder.
PACKAGED_DATA = Path(__file__).resolve().parent / "files"
_GENERIC_FORMAT = 'each line must be {"prompt": "...", "completion": "..."} or {"text": "..."}'


from gradpruner.data.tasks import (  # noqa: F401 (re-exported)
    HUB_SOURCES,
    TASKS,
    Example,
    RowError,
    TaskSpec,
    json_type,
    split_indices,
    string_field,
)


# ------------------------------------------------------------------------------------ reading
def _read_jsonl_rows(path: Path, problems: list[str]) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for every well-formed non-blank line.

    Bad lines are appended to ``problems`` (one sentence each) instead of raised, so a user sees
    every mistake in one go.  Lines are read as bytes and decoded one by one, which lets a
    non-UTF-8 byte be pinned to its line; nothing from a line is echoed, so huge lines stay cheap.
    """
    with open(path, "rb") as f:
        for lineno, raw, size in _lines(f):
            if raw is None:
                problems.append(f"{path} line {lineno} is {size / 2**20:.1f} MiB, over the limit of "
                                f"{MAX_LINE_BYTES // 2**20} MiB per line; shorten or split that example.")
            elif raw.strip():
                row, why = _parse_line(raw)
                if why:
                    problems.append(f"{path} line {lineno} {why}.")
                else:
                    yield lineno, row


def _lines(f) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size) per line; bytes is None for a line over MAX_LINE_BYTES, which is
    skipped a chunk at a time so that no line, however long, is ever held in memory whole."""
    lineno = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield lineno, raw, len(raw)
            continue
        size = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(2**20)
            size += len(raw)
        yield lineno, None, size


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
        return None, f"is a JSON {json_type(row)}, not an object; write one JSON object per line"
    return row, None


def convert_file(path: Path, convert: Callable[[dict], object], fix: str) -> list:
    """Read ``path`` and convert every row, raising one error that lists all bad lines.

    ``convert`` usually makes an ``Example`` (then an empty completion is a bad line too); evaluation
    passes converters that make evaluation items.
    """
    problems: list[str] = []
    examples: list = []
    for lineno, row in _read_jsonl_rows(path, problems):
        try:
            example = convert(row)
            if isinstance(example, Example) and not example.completion.strip():
                raise RowError("has an empty completion")
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
            raise RowError("has both 'text' and 'prompt'/'completion' keys")
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise RowError(f"lacks the key {missing[0]!r}")
        return Example(string_field(row, "prompt"), string_field(row, "completion"))
    if "text" in row:
        text = string_field(row, "text")
        if not text.strip():
            raise RowError("has an empty 'text'")
        return Example("", text)
    raise RowError("has neither 'prompt'/'completion' nor 'text' keys")


def require_file(path: Path, what: str, hint: str) -> None:
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise GradPrunerError(f"{what} {path} {kind}; {hint}.")


def load_jsonl(path: str | Path) -> list[Example]:
    """Load a generic JSONL file: every non-blank line is {"prompt", "completion"} or {"text"}.

    Extra keys are ignored.  All malformed lines are reported together in one GradPrunerError.
    """
    path = Path(path)
    require_file(path, "Data file", "pass the path of an existing JSONL file with --data")
    return convert_file(path, _generic_row, _GENERIC_FORMAT)


# ------------------------------------------------------------------------------------ loading
def default_data_dir(task: str | None = None) -> Path | None:
    """Where task files are read from when no --data-dir is given.

    $GRADPRUNER_DATA_DIR if set; else, for a task whose files ship with the package (ARC-Easy),
    the packaged folder; else None (then the caller asks for --data-dir).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    if task is not None and task in TASKS and packaged(task):
        return PACKAGED_DATA
    return None


def packaged(task: str) -> bool:
    """Whether every file of ``task`` ships inside the package."""
    spec = TASKS[task]
    return all((PACKAGED_DATA / rel).is_file() for rel in spec.train_files + spec.eval_files)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise did_you_mean(split, SPLITS, "split")


def load_task(name: str, split: str = "train", data_dir: str | Path | None = None,
              seed: int = 0) -> list[Example]:
    """The ``split`` ("train" or "eval") of a registered task.

    ``data_dir`` is a folder of task files, ``"hub"`` (the Hugging Face Hub) or None: then
    $GRADPRUNER_DATA_DIR, else the files packaged with gradpruner for the tasks that ship (ARC-Easy).

    ``seed`` only matters for tasks without an official split (``TaskSpec.split`` says which):
    train and eval are then disjoint parts of one file, and the same seed always gives the same parts.
    """
    spec: TaskSpec = lookup(TASKS, name, "task")
    return load_task_rows(name, split, spec.to_example, data_dir, seed)


def load_task_rows(name: str, split: str, convert: Callable[[dict], object],
                   data_dir: str | Path | None = None, seed: int = 0) -> list:
    """Like ``load_task`` but each row of the split becomes ``convert(row)`` (e.g. an evaluation item).

    The rows and their order are exactly those ``load_task`` turns into examples.
    """
    spec: TaskSpec = lookup(TASKS, name, "task")
    check_split(split)
    if data_dir == HUB:
        return [_convert_hub_row(name, i, row, convert) for i, row in enumerate(_hub_rows(name, split, seed))]
    root = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if root is None:
        raise GradPrunerError(f"No data folder for task {name!r}: its files do not ship with gradpruner; "
                              f"pass the folder holding them with --data-dir DIR (or set {DATA_DIR_ENV}), "
                              "or --data-dir hub to read the task from the Hugging Face Hub.")
    if not root.is_dir():
        raise GradPrunerError(f"Data directory {root} does not exist; {_DIR_HINT}.")
    files = spec.eval_files if (split == "eval" and spec.eval_files) else spec.train_files
    examples: list = []
    for rel in files:
        require_file(root / rel, f"Task file for {name!r}", _DIR_HINT)
        examples.extend(convert_file(root / rel, convert, task_fix(name)))
    if spec.eval_files:
        return examples
    train_idx, eval_idx = split_indices(len(examples), seed, spec.eval_fraction)
    return [examples[i] for i in (train_idx if split == "train" else eval_idx)]


def _hub_rows(name: str, split: str, seed: int) -> list[dict]:
    """The task's rows from the Hugging Face Hub, for users with the network (``--data-dir hub``)."""
    src = HUB_SOURCES[name]
    try:
        import datasets
    except ImportError:
        raise GradPrunerError(f"Task {name!r}: reading it from the Hub needs the `datasets` package, which is "
                              "not installed; pip install datasets, or pass the folder holding the task's files "
                              "with --data-dir DIR.") from None
    hub_split = src.eval if (split == "eval" and src.eval) else src.train
    try:
        rows = [src.adapt(dict(r)) if src.adapt else dict(r) for r in datasets.load_dataset(src.path, src.name, split=hub_split)]
    except Exception as exc:  # network, missing dataset, changed schema: all end the same way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GradPrunerError(f"Could not read task {name!r} from the Hub dataset {src.path} ({first}); "
                              f"{_DIR_HINT}.") from None
    if src.eval:
        return rows
    train_idx, eval_idx = split_indices(len(rows), seed, TASKS[name].eval_fraction)
    return [rows[i] for i in (train_idx if split == "train" else eval_idx)]


def _convert_hub_row(name: str, index: int, row: dict, convert):
    try:
        return convert(row)
    except (ValueError, LookupError, TypeError, AttributeError) as e:
        why = f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise GradPrunerError(f"Hub row {index} of task {name!r} {why}; the Hub dataset may have changed, "
                              "pass --data-dir DIR with the task's JSONL files instead.") from None


def task_fix(name: str) -> str:
    """What to do about a bad line of a ``name`` task file."""
    return f"the {name} file should hold the original dataset rows, one JSON object per line"


def load_examples(task: str | None = None, data: str | Path | None = None, split: str = "train",
                  data_dir: str | Path | None = None, seed: int = 0) -> list[Example]:
    """Examples from exactly one of a registered ``task`` or a generic JSONL ``data`` file.

    For a ``data`` file both splits return every line: the file has no split of its own, so the
    caller decides whether to hold some out (e.g. with ``split_indices``) or to pass a second file.
    """
    if (task is None) == (data is None):
        raise GradPrunerError("Give exactly one of a task name (--task) or a JSONL file (--data).")
    check_split(split)
    if task is not None:
        return load_task(task, split, data_dir=data_dir, seed=seed)
    return load_jsonl(data)


# ------------------------------------------------------------------------------- tokenisation
def special_prefix(tokenizer) -> list[int]:
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


def fit_to_length(prefix: list[int], body: list[int], completion: list[int],
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


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
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
    prefix = special_prefix(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    suffix = [eos] if eos is not None else []
    prompts = token_ids(tokenizer, [ex.prompt for ex in examples])
    completions = token_ids(tokenizer, [ex.completion for ex in examples])
    out, dropped = [], 0
    for body, comp in zip(prompts, completions):
        prompt_ids, comp_ids = fit_to_length(prefix, list(body), list(comp) + suffix, max_length)
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
