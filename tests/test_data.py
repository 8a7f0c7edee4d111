"""Tests for gradpruner.data.examples: task loaders, generic JSONL, tokenisation and padding."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import make_tiny_tokenizer, offline_data_dir

from gradpruner.data.examples import (
    PACKAGED_DATA,
    PadCollator,
    default_data_dir,
    load_examples,
    load_jsonl,
    load_task,
    tokenize,
)
from gradpruner.data.tasks import KINDS, TASKS, Example, split_indices
from gradpruner.errors import GradPrunerError

DATA_DIR = offline_data_dir()
needs_data = pytest.mark.needs_data  # skips without the offline datasets, fails under CI (conftest.py)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- real task files


@needs_data
def test_arc_easy_counts_and_first_example():
    train = load_task("arc_easy", "train", data_dir=DATA_DIR)
    evals = load_task("arc_easy", "eval", data_dir=DATA_DIR)
    assert (len(train), len(evals)) == (2251, 570)
    with open(DATA_DIR / "arc_easy" / "train.jsonl", encoding="utf-8") as f:
        row = json.loads(f.readline())
    answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    assert train[0] == Example(f"Question: {row['question']}\nAnswer:", " " + answer)
    assert train[0].prompt == ("Question: Which factor will most likely cause a person to develop "
                               "a fever?\nAnswer:")
    assert train[0].completion == " a bacterial population in the bloodstream"


@needs_data
def test_arc_easy_numeric_answer_keys_resolve_through_labels():
    with open(DATA_DIR / "arc_easy" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    train = load_task("arc_easy", "train", data_dir=DATA_DIR)
    digit = [i for i, r in enumerate(rows) if r["answerKey"].isdigit()]
    assert digit, "expected some rows with answerKey '1'..'4'"
    for i in digit[:20]:
        labels = rows[i]["choices"]["label"]
        assert train[i].completion == " " + rows[i]["choices"]["text"][labels.index(rows[i]["answerKey"])]


@needs_data
def test_piqa_deterministic_split():
    train = load_task("piqa", "train", data_dir=DATA_DIR, seed=0)
    evals = load_task("piqa", "eval", data_dir=DATA_DIR, seed=0)
    assert len(train) + len(evals) == 1338
    assert len(evals) == round(1338 * 0.2)
    tr_idx, ev_idx = split_indices(1338, 0)
    assert set(tr_idx).isdisjoint(ev_idx) and set(tr_idx) | set(ev_idx) == set(range(1338))
    assert load_task("piqa", "train", data_dir=DATA_DIR, seed=0) == train
    assert load_task("piqa", "train", data_dir=DATA_DIR, seed=1) != train
    with open(DATA_DIR / "piqa" / "validation_part.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    row = rows[tr_idx[0]]
    assert train[0] == Example(f"Question: {row['goal']}\nAnswer:",
                               " " + (row["sol1"], row["sol2"])[row["label"]])
    assert evals[0].prompt == f"Question: {rows[ev_idx[0]]['goal']}\nAnswer:"


@needs_data
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_loads_both_splits(name):
    assert TASKS[name].kind in KINDS
    for split in ("train", "eval"):
        examples = load_task(name, split, data_dir=DATA_DIR)
        assert examples, f"{name}/{split} is empty"
        assert all(isinstance(e, Example) and e.completion.strip() for e in examples)
        assert all(e.completion.startswith(" ") for e in examples)


# ----------------------------------------------------------------------- per-task formats (pure)


def test_hellaswag_preprocess_matches_lm_eval():
    row = {"activity_label": "Personal Care", "ctx_a": "[header] How to cut hair [title] Wet it.",
           "ctx_b": "", "endings": ["a", "[title] Comb it. [step] Slowly.", "c", "d"], "label": "1"}
    ex = TASKS["hellaswag"].to_example(row)
    # Like lm-eval: a leading "[title]" (no space before it) is removed, leaving a space behind.
    assert ex == Example("Personal Care: How to cut hair. Wet it.", "  Comb it. Slowly.")
    row2 = {"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
            "endings": ["x", "y", "z", "falls."], "label": "3"}
    assert TASKS["hellaswag"].to_example(row2) == Example("Roof: A man is on a roof. He", " falls.")


def test_other_task_formats():
    wino = {"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah",
            "option2": "Maria", "answer": "1"}
    assert TASKS["winogrande"].to_example(wino) == Example("Sarah beat Maria so Sarah", " got the prize.")
    med = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}
    assert TASKS["medmcqa"].to_example(med) == Example(
        "Question: Q?\nChoices:\nA. a\nB. b\nC. c\nD. d\nAnswer:", " C")
    pub = {"CONTEXTS": ["One.", "Two."], "QUESTION": "Q?", "final_decision": "yes",
           "LONG_ANSWER": "Because."}
    assert TASKS["pubmedqa"].to_example(pub) == Example(
        "Abstract: One.\nTwo.\nQuestion: Q?\nAnswer:", " yes. Because.")
    fin = {"instruction": "Sentiment?", "input": "Up 5%.", "output": "positive"}
    assert TASKS["fingpt_sentiment"].to_example(fin) == Example(
        "Instruction: Sentiment?\nInput: Up 5%.\nAnswer:", " positive")
    bill = {"text": "SECTION 1.", "summary": "A bill."}
    assert TASKS["billsum"].to_example(bill) == Example(
        "Summarize the following bill.\n\nSECTION 1.\n\nSummary:", " A bill.")
    assert {TASKS[n].split for n in TASKS} == {"official", "deterministic 80/20, seed"}


def test_split_indices_properties():
    for n in (0, 1, 2, 5, 101):
        tr, ev = split_indices(n, seed=3)
        assert sorted(tr + ev) == list(range(n)) and not set(tr) & set(ev)
        if n >= 2:
            assert tr and ev
    assert split_indices(50, 7) == split_indices(50, 7) != split_indices(50, 8)
    with pytest.raises(GradPrunerError, match="eval_fraction"):
        split_indices(10, 0, eval_fraction=1.0)


# ------------------------------------------------------------------------- task loading errors


def test_unknown_task_and_split_suggest_names(tmp_path):
    with pytest.raises(GradPrunerError, match="Unknown task 'arc_eazy'.*Did you mean 'arc_easy'"):
        load_task("arc_eazy", data_dir=tmp_path)
    with pytest.raises(GradPrunerError, match="Unknown split 'test'"):
        load_task("piqa", "test", data_dir=tmp_path)


def test_missing_data_dir_and_file_mention_data_dir(tmp_path):
    with pytest.raises(GradPrunerError, match="--data-dir") as err:
        load_task("piqa", data_dir=tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(GradPrunerError, match="--data-dir") as err:
        load_task("piqa", data_dir=tmp_path)
    assert "validation_part.jsonl" in str(err.value)


def test_malformed_task_row_names_file_and_line(tmp_path):
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})
    (tmp_path / "piqa").mkdir()
    write_lines(tmp_path / "piqa" / "validation_part.jsonl", [
        good, json.dumps({"goal": "g", "sol1": "a", "label": 1}), good,
        json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 7})])
    with pytest.raises(GradPrunerError) as err:
        load_task("piqa", data_dir=tmp_path)
    msg = str(err.value)
    assert "validation_part.jsonl line 2 lacks the field 'sol2'" in msg
    assert "validation_part.jsonl line 4 has label 7" in msg
    assert len(err.value.problems) == 2


# --------------------------------------------------- where task files come from, packaged ARC-Easy


def test_default_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADPRUNER_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert default_data_dir("arc_easy") == tmp_path  # the variable wins over the packaged files


def test_arc_easy_ships_with_the_package(monkeypatch, tmp_path):
    """With no --data-dir and no $GRADPRUNER_DATA_DIR, ARC-Easy is read from the package itself."""
    monkeypatch.delenv("GRADPRUNER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_data_dir("arc_easy") == PACKAGED_DATA
    assert default_data_dir() is None and default_data_dir("piqa") is None
    train, evals = load_task("arc_easy", "train"), load_task("arc_easy", "eval")
    assert (len(train), len(evals)) == (2251, 570)  # the official ARC-Easy train / validation sizes
    assert train[0] == Example("Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
                               " a bacterial population in the bloodstream")
    assert (PACKAGED_DATA / "README.md").read_text().count("CC BY-SA 4.0") >= 1


def test_task_that_does_not_ship_needs_a_data_dir(monkeypatch, tmp_path):
    """No silent fallback: not to ../shared/data beside the working directory, not to the Hub."""
    import datasets

    monkeypatch.delenv("GRADPRUNER_DATA_DIR", raising=False)
    (tmp_path / "shared" / "data" / "piqa").mkdir(parents=True)
    write_lines(tmp_path / "shared" / "data" / "piqa" / "validation_part.jsonl",
                [json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})] * 4)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")

    def no_hub(*a, **k):
        raise AssertionError("the Hub must be read only with --data-dir hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(GradPrunerError) as err:
        load_task("piqa", "train")
    assert len(err.value.problems) == 1
    msg = str(err.value)
    assert "'piqa'" in msg and "--data-dir DIR" in msg and "--data-dir hub" in msg and "shared" not in msg
    # The variable set to a folder without the task's files is an error too, never the packaged copy.
    monkeypatch.setenv("GRADPRUNER_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradPrunerError, match="arc_easy/train.jsonl does not exist"):
        load_task("arc_easy", "train")


@needs_data
def test_packaged_arc_easy_is_the_offline_copy():
    """The packaged files give exactly the examples (same rows, same order, same splits) of the offline copy."""
    from gradpruner.data.examples import load_task_rows
    from gradpruner.evaluation.evaluate import _eval_converter

    def items(split, root):
        return [r.item for r in load_task_rows("arc_easy", split, _eval_converter(TASKS["arc_easy"]), root)]

    for split, n in (("train", 2251), ("eval", 570)):
        ours = load_task("arc_easy", split, data_dir=PACKAGED_DATA)
        assert len(ours) == n and ours == load_task("arc_easy", split, data_dir=DATA_DIR)
        assert items(split, PACKAGED_DATA) == items(split, DATA_DIR)
    for rel in TASKS["arc_easy"].train_files + TASKS["arc_easy"].eval_files:
        assert (PACKAGED_DATA / rel).read_bytes() == (DATA_DIR / rel).read_bytes(), rel


# ------------------------------------------------------------------------------ generic JSONL


def test_load_jsonl_both_line_kinds_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Q: 2+2?", "completion": " 4", "id": 1}), "", "   ",
        json.dumps({"text": "free text"})])
    assert load_jsonl(path) == [Example("Q: 2+2?", " 4"), Example("", "free text")]
    assert load_examples(data=path, split="eval") == load_examples(data=str(path))


def test_load_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(GradPrunerError, match="does not exist.*--data") as err:
        load_jsonl(tmp_path / "missing.jsonl")
    assert "missing.jsonl" in str(err.value)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(GradPrunerError, match="empty.jsonl has no examples"):
        load_jsonl(empty)


def test_load_jsonl_reports_every_bad_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"prompt": "p"}),                       # line 2: missing key
        "{not json",                                       # line 3
        json.dumps(["a", "list"]),                         # line 4
        json.dumps({"prompt": 1, "completion": "c"}),      # line 5: non-string
        json.dumps({"prompt": "p", "completion": ""}),     # line 6: empty completion
        json.dumps({"other": "x"}),                        # line 7
    ])
    with pytest.raises(GradPrunerError) as err:
        load_jsonl(path)
    problems = err.value.problems
    assert len(problems) == 6
    assert all("bad.jsonl line" in p for p in problems)
    assert "line 2 lacks the key 'completion'" in problems[0]
    assert "line 3 is not valid JSON" in problems[1]
    assert "line 4 is a JSON array, not an object; write one JSON object per line." in problems[2]
    assert "line 5 has field 'prompt' of type number" in problems[3]
    assert "line 6 has an empty completion" in problems[4]
    assert "line 7 has neither" in problems[5]


def test_load_jsonl_caps_the_report(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", ["oops"] * 25)
    with pytest.raises(GradPrunerError) as err:
        load_jsonl(path)
    assert len(err.value.problems) == 11
    assert "and 15 more bad lines" in err.value.problems[-1]


def test_load_jsonl_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(GradPrunerError, match="latin1.jsonl line 2 is not valid UTF-8"):
        load_jsonl(path)


def test_load_jsonl_huge_line(tmp_path):
    path = write_lines(tmp_path / "big.jsonl", [json.dumps({"text": "x" * 2_000_000}), "[" * 100_000])
    with pytest.raises(GradPrunerError) as err:
        load_jsonl(path)
    # The line is not echoed back, and deep nesting is a reported problem, not a RecursionError.
    assert "big.jsonl line 2 nests too deeply" in str(err.value) and len(str(err.value)) < 1000
    assert load_jsonl(write_lines(tmp_path / "ok.jsonl", [json.dumps({"text": "x" * 2_000_000})]))


def test_load_examples_needs_exactly_one_source(tmp_path):
    with pytest.raises(GradPrunerError, match="exactly one"):
        load_examples()
    with pytest.raises(GradPrunerError, match="exactly one"):
        load_examples(task="piqa", data=tmp_path / "x.jsonl")


# ----------------------------------------------------------------------------------- tokenize


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def test_tiny_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer
    text = "héllo ☃ [x]\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id
    make_tiny_tokenizer(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_tokenize_masks_prompt_and_appends_eos(tok):
    [feat] = tokenize([Example("Q: hi\nA:", " yes")], tok)
    prompt = [tok.bos_token_id] + tok("Q: hi\nA:", add_special_tokens=False)["input_ids"]
    completion = tok(" yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert feat["input_ids"] == prompt + completion
    assert feat["labels"] == [-100] * len(prompt) + completion


def test_tokenize_text_line_keeps_bos_only_as_prompt(tok):
    [feat] = tokenize([Example("", "abc")], tok)
    assert feat["input_ids"][0] == tok.bos_token_id and feat["labels"][0] == -100
    assert feat["labels"][1:] == feat["input_ids"][1:]


def test_tokenize_truncates_prompt_from_the_left(tok):
    [feat] = tokenize([Example("0123456789", " ab")], tok, max_length=8)
    ids = feat["input_ids"]
    assert len(ids) == 8
    # BOS, then the *last* 3 prompt bytes, then the whole completion with EOS.
    assert tok.decode(ids[1:4]) == "789" and ids[0] == tok.bos_token_id
    assert tok.decode(ids[4:7]) == " ab" and ids[7] == tok.eos_token_id
    assert feat["labels"] == [-100] * 4 + ids[4:]


def test_tokenize_truncates_long_completion_from_the_right(tok):
    [feat] = tokenize([Example("prompt", "abcdefghij")], tok, max_length=5)
    assert feat["input_ids"][0] == tok.bos_token_id and feat["labels"][0] == -100
    assert tok.decode(feat["input_ids"][1:]) == "abcd"
    assert feat["labels"][1:] == feat["input_ids"][1:]


def test_tokenize_drops_examples_without_loss_tokens(tok, caplog):
    tok_no_eos = make_tiny_tokenizer()
    tok_no_eos.eos_token = None
    with caplog.at_level(logging.WARNING, logger="gradpruner.data.examples"):
        out = tokenize([Example("p", ""), Example("p", "x")], tok_no_eos)
    assert len(out) == 1 and out[0]["labels"][-1] != -100
    assert "Dropped 1 of 2" in caplog.text
    with pytest.raises(GradPrunerError, match="None of the 1 examples"):
        tokenize([Example("p", "")], tok_no_eos)
    with pytest.raises(GradPrunerError, match="max_length"):
        tokenize([Example("p", "x")], tok, max_length=0)


# --------------------------------------------------------------------------------- PadCollator


def test_pad_collator(tok):
    feats = tokenize([Example("ab", " c"), Example("abcdef", " ghi")], tok)
    batch = PadCollator(tok.pad_token_id)(feats)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, n1) for t in batch.values())
    assert batch["input_ids"][0, n0:].tolist() == [tok.pad_token_id] * (n1 - n0)
    assert batch["labels"][0, n0:].tolist() == [-100] * (n1 - n0)
    assert batch["attention_mask"].tolist() == [[1] * n0 + [0] * (n1 - n0), [1] * n1]
    assert batch["input_ids"][1].tolist() == feats[1]["input_ids"]
    with pytest.raises(GradPrunerError, match="pad token"):
        PadCollator(None)


def test_tasks_read_from_the_hub_for_users_with_the_network(monkeypatch):
    """`--data-dir hub` reads the Hub dataset (here a stand-in) through the same row converters."""
    import datasets

    calls = []
    arc_row = {"id": "q1", "question": "Which is a metal?", "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
               "answerKey": "B"}
    pubmed_row = {"pubid": 1, "question": "Does it work?", "context": {"contexts": ["Some", "context"]},
                  "long_answer": "It does.", "final_decision": "yes"}

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return [arc_row] * 3 if path == "allenai/ai2_arc" else [dict(pubmed_row, pubid=i) for i in range(10)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train = load_task("arc_easy", "train", data_dir="hub")
    assert train[0].completion == " iron" and calls[-1] == ("allenai/ai2_arc", "ARC-Easy", "train")
    load_task("arc_easy", "eval", data_dir="hub")
    assert calls[-1][2] == "validation"
    tr, ev = load_task("pubmedqa", "train", data_dir="hub"), load_task("pubmedqa", "eval", data_dir="hub")
    assert len(tr) + len(ev) == 10 and tr[0].completion.startswith(" yes. It does.")  # deterministic split


def test_hub_failure_is_one_clear_sentence(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nlong trace")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GradPrunerError, match="Could not read task 'piqa' from the Hub dataset ybisk/piqa"):
        load_task("piqa", "train", data_dir="hub")
