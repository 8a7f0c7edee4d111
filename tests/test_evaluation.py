"""Evaluation: task formats vs lm-evaluation-harness, KV-reuse scoring vs naive scoring, generation,
the evaluate() result, bad input, and (slow) agreement with lm-eval's HFLM on SmolLM2-135M."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    make_tiny_model,
    make_tiny_tokenizer,
    offline_data_dir,
    qa_rows,
    write_jsonl,
)

from gradpruner.data.examples import load_task, tokenize
from gradpruner.data.tasks import TASKS, Example, GenItem, MCItem
from gradpruner.errors import GradPrunerError
from gradpruner.evaluation.evaluate import (
    EvalRow,
    check_disjoint,
    completion_stats,
    evaluate,
    generate_answers,
    heldout_loss,
    overlapping,
)
from gradpruner.evaluation.loglik import encode_pair, score_choices

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

DATA_DIR = offline_data_dir()
needs_data = pytest.mark.needs_data  # skips without the offline datasets, fails under CI (conftest.py)
MC_TASKS = [n for n, s in TASKS.items() if s.to_choices]
GEN_TASKS = [n for n, s in TASKS.items() if s.to_generation]
FILES = {"arc_easy": "arc_easy/validation.jsonl", "piqa": "piqa/validation_part.jsonl",
         "hellaswag": "hellaswag/validation_part.jsonl", "winogrande": "winogrande/winogrande_xl_validation.jsonl",
         "medmcqa": "medmcqa/validation.jsonl", "pubmedqa": "pubmedqa/pqa_labeled_test.jsonl"}


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama")


def _rows(task: str, n: int) -> list[dict]:
    with open(DATA_DIR / FILES[task], encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


# ------------------------------------------------------------------- formats, hand-written rows
def test_mc_formats_on_hand_written_rows():
    arc = TASKS["arc_easy"].to_choices({"question": "Which is a gas?", "answerKey": "2",
                                        "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}})
    assert arc == MCItem(("Question: Which is a gas?\nAnswer:",) * 2, (" ice", " steam"), ("ice", "steam"), 1)
    piqa = TASKS["piqa"].to_choices({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat it.", "label": 0})
    assert piqa.contexts[0] == "Question: Open a jar\nAnswer:" and piqa.continuations == (" Twist the lid.", " Eat it.")
    hs = TASKS["hellaswag"].to_choices({"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                                        "endings": ["[step] sits.", "falls."], "label": "1"})
    assert hs == MCItem(("Roof: A man is on a roof. He",) * 2, ("  sits.", " falls."), (" sits.", "falls."), 1)
    wino = TASKS["winogrande"].to_choices({"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah",
                                           "option2": "Maria", "answer": "2"})
    assert wino == MCItem(("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"), (" got the prize.",) * 2,
                          ("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"), 1)
    med = TASKS["medmcqa"].to_choices({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 3})
    assert med.contexts[0] == "Question: Q?\nChoices:\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert (med.continuations, med.gold) == ((" A", " B", " C", " D"), 3)
    for item in (arc, piqa, hs, wino, med):  # the training example is the gold choice
        assert item.example() == Example(item.contexts[item.gold], item.continuations[item.gold])


def test_generation_formats_on_hand_written_rows():
    pub = TASKS["pubmedqa"].to_generation({"CONTEXTS": ["One.", "Two."], "QUESTION": "Q?", "final_decision": "Maybe",
                                           "LONG_ANSWER": "Because."})
    assert pub == GenItem("Abstract: One.\nTwo.\nQuestion: Q?\nAnswer:", "Because.", "maybe")
    fin = TASKS["fingpt_sentiment"].to_generation({"instruction": "Sentiment?", "input": "Up 5%.", "output": "Positive"})
    assert fin == GenItem("Instruction: Sentiment?\nInput: Up 5%.\nAnswer:", "Positive", "positive")
    bill = TASKS["billsum"].to_generation({"text": "SECTION 1.", "summary": "A bill."})
    assert bill == GenItem("Summarize the following bill.\n\nSECTION 1.\n\nSummary:", "A bill.", None)
    with pytest.raises(ValueError, match="final_decision 'perhaps'"):
        TASKS["pubmedqa"].to_generation({"CONTEXTS": [], "QUESTION": "Q", "final_decision": "perhaps", "LONG_ANSWER": ""})
    with pytest.raises(ValueError, match="output 'bullish'"):
        TASKS["fingpt_sentiment"].to_generation({"instruction": "", "input": "", "output": "bullish"})


# ------------------------------------------------------------- formats vs lm-eval's own configs
@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's ConfigurableTask for each task, built from its installed YAML, fed our rows."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[test]')")
    import datasets
    import lm_eval.tasks as lm_tasks
    from lm_eval.api.task import ConfigurableTask

    root = Path(lm_tasks.__file__).parent
    manager = lm_tasks.TaskManager(include_path=[str(root / d) for d in (
        "arc", "piqa", "hellaswag", "winogrande", "medmcqa", "pubmedqa")], include_defaults=False)
    feed: dict = {}

    def offline_download(self, *args, **kwargs):  # no dataset download: the rows of this test
        self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(feed["rows"])
                                             for s in ("train", "validation", "test")})

    def build(name: str, rows: list[dict]):
        feed["rows"] = rows
        original, ConfigurableTask.download = ConfigurableTask.download, offline_download
        try:
            task = manager.load([name])["tasks"][name] if hasattr(manager, "load") else manager.load_task_or_group([name])[name]
        finally:
            ConfigurableTask.download = original
        task.build_all_requests(limit=len(rows), rank=0, world_size=1)
        return task
    return build


@needs_data
@pytest.mark.parametrize("name", MC_TASKS + ["pubmedqa"])
def test_formats_match_lm_eval_requests(name, lm_eval_tasks):
    rows = _rows(name, 12)
    if name == "arc_easy":  # include rows whose answerKey is a digit
        with open(DATA_DIR / FILES[name], encoding="utf-8") as f:
            rows += [r for r in map(json.loads, f) if r["answerKey"].isdigit()][:3]
    task = lm_eval_tasks(name, rows)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    assert len(by_doc) == len(rows)
    for doc_id, row in enumerate(rows):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        requests = [tuple(i.arguments) for i in insts]
        if name == "pubmedqa":
            assert TASKS[name].to_generation(row).prompt == requests[0][0]
            continue
        item = TASKS[name].to_choices(row)
        assert list(zip(item.contexts, item.continuations)) == requests
        doc = insts[0].doc
        assert list(item.choices) == list(task.doc_to_choice(doc))
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        gold = task.doc_to_choice(doc).index(gold) if isinstance(gold, str) else gold
        assert item.gold == gold


@needs_data
@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_rows_align_with_training_examples(name):
    """The evaluation items are the same rows, in the same order, as load_task's examples."""
    from gradpruner.data.examples import load_task_rows
    from gradpruner.evaluation.evaluate import _eval_converter

    for split in ("train", "eval"):
        rows = load_task_rows(name, split, _eval_converter(TASKS[name]), DATA_DIR, seed=3)
        assert [r.example for r in rows] == load_task(name, split, DATA_DIR, seed=3)


# ------------------------------------------------------------------- KV-reuse scoring vs naive
def _naive(model, tok, item: MCItem, max_len: int | None = None) -> list[float]:
    """lm-eval's HFLM computation, one sequence per choice and logits everywhere."""
    out = []
    for ctx, cont in zip(item.contexts, item.continuations):
        c, k = encode_pair(tok, ctx, cont)
        seq = (c + k)[-(max_len + 1):] if max_len else c + k
        with torch.no_grad():
            logits = model(torch.tensor([seq[:-1]])).logits[0, -len(k):]
        out.append(float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(k)[:, None]).sum()))
    return out


def _items() -> list[MCItem]:
    arc = [TASKS["arc_easy"].to_choices({"question": "Which one is hot? " * k, "answerKey": "A", "choices": {
        "text": ["the sun", "an ice cube in a glass", "x", "snow"], "label": list("ABCD")}}) for k in (1, 4, 2)]
    wino = TASKS["winogrande"].to_choices({"sentence": "The trophy did not fit in the case because _ was too big.",
                                           "option1": "the trophy", "option2": "it", "answer": "1"})
    med = TASKS["medmcqa"].to_choices({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2})
    odd = MCItem(("", "Answer: "), (" yes", "no"), ("yes", "no"), 0)  # empty context; trailing space moves
    return arc + [wino, med, odd]


def _wide_window_gemma3():
    from helpers import TINY_CONFIGS
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS["gemma3_text"](4)
    config.sliding_window = 200  # longer than every packed row below
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,method", [("llama", "packed"), ("llama", "cache"), ("llama", "auto"),
                                         ("gemma3_text", "auto"), ("qwen2", "auto"), ("gemma3_wide", "packed")])
def test_score_choices_equals_naive_scoring(arch, method, tok):
    # gemma3/qwen2 have 4-token sliding windows, far shorter than the contexts: "auto" takes the
    # KV-cache path for them; the wide-window gemma3 checks the packed mask on a mixed-layer model.
    model = _wide_window_gemma3() if arch == "gemma3_wide" else make_tiny_model(arch)
    items = _items()
    want = [_naive(model, tok, it) for it in items]
    for batch_size in (1, 3, 8):
        got = score_choices(model, tok, items, batch_size=batch_size, progress=False, method=method)
        assert [len(g) for g in got] == [len(it.contexts) for it in items]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-4)


def test_score_choices_unknown_method(tok, tiny):
    with pytest.raises(GradPrunerError, match="Unknown scoring method 'pack'.*Did you mean 'packed'"):
        score_choices(tiny, tok, _items()[:1], method="pack")


def test_encode_pair_moves_trailing_space(tok):
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")
    ctx, cont = encode_pair(tok, "Q:", " yes")
    assert ctx[0] == tok.bos_token_id and tok.decode(cont) == " yes"
    assert encode_pair(tok, "", "yes") == ([tok.bos_token_id], tok.encode("yes", add_special_tokens=False))


def test_score_choices_truncates_like_lm_eval(tok):
    model = make_tiny_model("llama")  # max_position_embeddings = 256
    item = TASKS["piqa"].to_choices({"goal": "word " * 80, "sol1": "one two", "sol2": "three", "label": 0})
    for method in ("packed", "cache"):
        got = score_choices(model, tok, [item], progress=False, method=method)[0]
        assert got == pytest.approx(_naive(model, tok, item, max_len=256), abs=1e-4)


def _hflm_logliks(model, tok, items: list[MCItem], max_length: int) -> list[list[float]]:
    """lm-evaluation-harness's own HFLM, given ``max_length``, on the items' (context, continuation) pairs."""
    hf = pytest.importorskip("lm_eval.models.huggingface", reason="lm-evaluation-harness is not installed")
    from lm_eval.api.instance import Instance

    lm = hf.HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=max_length)
    requests = [Instance("loglikelihood", {}, (c, k), j) for it in items for j, (c, k) in
                enumerate(zip(it.contexts, it.continuations))]
    flat = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
    return [[next(flat) for _ in it.contexts] for it in items]


def test_max_length_truncates_multiple_choice_like_lm_eval(tiny, tok):
    from gradpruner.evaluation.evaluate import _load

    # ARC-Easy ships with the package; 48 tokens of the byte-level tokenizer hold each of these items' answers
    # (9 to 42 tokens) but not their questions (64 to 139)
    items = [r.item for r in _load("arc_easy", None, "eval", None, 0, True)[0][:4]]
    want = _hflm_logliks(tiny, tok, items, 48)

    def logliks(**settings):
        res = evaluate(tiny, tok, "arc_easy", limit=4, progress=False, details=True, **settings)
        return [d["loglik"] for d in res["details"]]

    full, short = logliks(), logliks(max_length=48)
    assert all(abs(a - b) > 1e-3 for s, f in zip(short, full) for a, b in zip(s, f))
    for s, w in zip(short, want):
        assert s == pytest.approx(w, abs=1e-4)
    assert logliks(max_length=10**6) == full  # beyond the model's context (256): as without it
    for method in ("packed", "cache"):
        got = score_choices(tiny, tok, items, progress=False, method=method, max_length=48)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-4)
    with pytest.raises(GradPrunerError, match="An answer choice is 42 tokens, more than --max-length 41"):
        score_choices(tiny, tok, items, progress=False, max_length=41)  # HFLM asserts the same


def test_max_length_truncates_generation_prompts_from_the_left(tiny, tok, tmp_path, monkeypatch):
    rows = [{"instruction": "What is the sentiment of this news? Answer negative, neutral or positive. " * 2,
             "input": f"Shares of company {i} rose five percent after the report.", "output": "positive"}
            for i in range(3)]
    data = write_jsonl(tmp_path / "fingpt.jsonl", rows)
    widths, generate = [], type(tiny).generate

    def spy(self, input_ids=None, **kwargs):
        widths.append(input_ids.shape[1])
        return generate(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(tiny), "generate", spy)

    def predictions(**settings):
        widths.clear()
        res = evaluate(tiny, tok, "fingpt_sentiment", data=data, max_new_tokens=4, progress=False, details=True,
                       **settings)
        return [d["prediction"] for d in res["details"]]

    full = predictions()
    assert max(widths) > 100  # the whole prompt, BOS included
    predictions(max_length=40)
    assert widths and max(widths) <= 40 - 4  # room left for the 4 new tokens
    assert predictions(max_length=10**6) == full
    with pytest.raises(GradPrunerError, match="--max-length 4"):
        evaluate(tiny, tok, "fingpt_sentiment", data=data, max_new_tokens=4, max_length=4, progress=False)


# ---------------------------------------------------------------------- generation and file stats
def test_generate_answers_batched_equals_one_by_one(tok, tiny):
    prompts = ["Q: a?\nA:", "Question: a much longer prompt here?\nAnswer:", "x"]
    batched = generate_answers(tiny, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate_answers(tiny, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)
    stop = batched[0][2:4]
    with_stop = generate_answers(tiny, tok, prompts, max_new_tokens=6, stop=(stop,), progress=False)
    # Cut before the stop string, which only counts in the new text (prompt 0 ends with ":").
    assert with_stop[0] == batched[0].split(stop, 1)[0] and len(with_stop[0]) <= 2


def test_completion_stats_loss_and_greedy(tok, tiny):
    feats = tokenize([Example(r["prompt"], r["completion"]) for r in qa_rows(6)], tok)
    stats = completion_stats(tiny, tok, feats, batch_size=4, progress=False)
    # The same loss as a plain right-padded forward pass over whole sequences.
    total, count = 0.0, 0
    for f in feats:
        with torch.no_grad():
            logits = tiny(torch.tensor([f["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(f["labels"][1:])
        mask = labels != -100
        total += float(torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0][mask].sum())
        count += int(mask.sum())
    assert sum(s[0] for s in stats) == pytest.approx(total, abs=1e-3) and sum(s[1] for s in stats) == count
    assert heldout_loss(tiny, tok, feats) == pytest.approx(-total / count, abs=1e-5)
    # A "completion" that is the model's own greedy continuation is an exact match.
    prompt = [tok.bos_token_id] + tok.encode("Q: hi\nA:", add_special_tokens=False)
    greedy = tiny.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    own = {"input_ids": prompt + greedy, "labels": [-100] * len(prompt) + greedy}
    other = {"input_ids": prompt + greedy[:-1] + [(greedy[-1] + 1) % 250 + 3],
             "labels": [-100] * len(prompt) + greedy[:-1] + [(greedy[-1] + 1) % 250 + 3]}
    assert [s[2] for s in completion_stats(tiny, tok, [own, other], progress=False)] == [True, False]


# ----------------------------------------------------------------------------------- evaluate()
@needs_data
def test_evaluate_mc_result_and_out_file(tiny, tok, tmp_path):
    out = tmp_path / "res.json"
    res = evaluate(tiny, tok, "arc_easy", limit=5, batch_size=2, progress=False, out=out, details=True)
    assert {"task", "metric", "value", "n", "metrics", "split", "seed", "seconds"} <= set(res)
    assert (res["task"], res["metric"], res["n"], res["split"]) == ("arc_easy", "acc", 5, "eval")
    assert set(res["metrics"]) == {"acc", "acc_norm"} and res["value"] == res["metrics"]["acc"]
    assert res["excluded_overlap"] == 1  # one ARC-Easy validation question is also in its train split
    assert json.loads(out.read_text())["metrics"] == res["metrics"]
    assert len(res["details"]) == 5 and len(res["details"][0]["loglik"]) >= 3
    with pytest.raises(GradPrunerError, match="already exists"):
        evaluate(tiny, tok, "arc_easy", limit=1, out=out, progress=False)
    # offset: a validation slice disjoint from the first items (the test slice), same items as a longer run
    later = evaluate(tiny, tok, "arc_easy", offset=3, limit=2, batch_size=2, progress=False, details=True)
    assert later["n"] == 2 and later["offset"] == 3 and [d["gold"] for d in later["details"]] == [d["gold"] for d in res["details"][3:5]]
    for a, b in zip(later["details"], res["details"][3:5]):  # batch composition moves the last digits only
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-5)
    with pytest.raises(GradPrunerError, match="offset 100000 skips all"):
        evaluate(tiny, tok, "arc_easy", offset=100000, progress=False)
    with pytest.raises(GradPrunerError, match="offset -1 must be"):
        evaluate(tiny, tok, "arc_easy", offset=-1, progress=False)
    wino = evaluate(tiny, tok, "winogrande", limit=3, progress=False, metric="acc")
    assert set(wino["metrics"]) == {"acc"} and 0 <= wino["value"] <= 1


@needs_data
def test_item_scores_one_number_per_item_by_id(tiny, tok, tmp_path):
    from gradpruner.evaluation.stats import paired_scores

    res = evaluate(tiny, tok, "arc_easy", limit=5, batch_size=2, progress=False, item_scores=True)
    items = res["item_scores"]
    assert items["metric"] == "acc" and items["ids"] == [0, 1, 2, 3, 4] and set(items["values"]) <= {0.0, 1.0}
    assert sum(items["values"]) / 5 == pytest.approx(res["value"]) and "details" not in res
    later = evaluate(tiny, tok, "arc_easy", offset=3, limit=2, batch_size=2, progress=False, item_scores=True)
    assert later["item_scores"]["ids"] == [3, 4] and later["item_scores"]["values"] == items["values"][3:]
    assert paired_scores(res, res) == (items["values"], items["values"])
    with pytest.raises(GradPrunerError, match="not the same held-out items"):
        paired_scores(res, later)
    assert "item_scores" not in evaluate(tiny, tok, "arc_easy", limit=2, progress=False)  # only when asked
    fin = evaluate(tiny, tok, "fingpt_sentiment", limit=3, batch_size=2, progress=False, item_scores=True)
    assert fin["item_scores"]["metric"] == "label_acc" and len(fin["item_scores"]["values"]) == 3
    data = write_jsonl(tmp_path / "eval.jsonl", qa_rows(3))
    assert "item_scores" not in evaluate(tiny, tok, data=data, progress=False, item_scores=True)  # loss is pooled


@needs_data
def test_evaluate_generative_tasks(tiny, tok):
    fin = evaluate(tiny, tok, "fingpt_sentiment", limit=3, batch_size=2, progress=False, details=True)
    assert fin["metric"] == "label_acc" and fin["n"] == 3 and "encoder" not in fin
    assert {d["label"] for d in fin["details"]} <= {"negative", "neutral", "positive"}
    pub = evaluate(tiny, tok, "pubmedqa", limit=2, batch_size=2, max_new_tokens=4, progress=False)
    assert set(pub["metrics"]) == {"rouge_bertscore", "rouge_l", "bertscore", "decision_acc"}
    assert pub["value"] == pytest.approx((pub["metrics"]["rouge_l"] + pub["metrics"]["bertscore"]) / 2)
    assert "MiniLM" in pub["encoder"] and pub["max_new_tokens"] == 4


@needs_data
def test_evaluate_loads_a_model_folder(tiny_llama):
    res = evaluate(str(tiny_llama), task="medmcqa", limit=2, progress=False)
    assert (res["model"], res["n"]) == (str(tiny_llama), 2)


def test_evaluate_generic_file(tiny, tok, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", qa_rows(6))
    res = evaluate(tiny, tok, data=data, progress=False)
    assert (res["task"], res["metric"], res["n"], res["higher_is_better"]) == ("jsonl", "loss", 6, False)
    assert set(res["metrics"]) == {"loss", "exact_match"} and math.isfinite(res["value"]) and res["value"] > 0
    assert res["metrics"]["exact_match"] == 0.0  # a random model does not reproduce the completions


# ---------------------------------------------------------------------------------- bad input
def test_unknown_task_and_metric(tiny, tok):
    with pytest.raises(GradPrunerError, match="Unknown task 'arc_eazy'.*Did you mean 'arc_easy'"):
        evaluate(tiny, tok, "arc_eazy")
    with pytest.raises(GradPrunerError, match="Unknown metric 'acc_nrom'.*Did you mean 'acc_norm'"):
        evaluate(tiny, tok, "arc_easy", metric="acc_nrom")
    with pytest.raises(GradPrunerError, match="Metric 'rouge_l' does not apply to task arc_easy; choose one of: acc, acc_norm"):
        evaluate(tiny, tok, "arc_easy", metric="rouge_l")
    with pytest.raises(GradPrunerError, match="Metric 'acc' does not apply to a prompt/completion file"):
        evaluate(tiny, tok, data="x.jsonl", metric="acc")
    with pytest.raises(GradPrunerError, match="limit 0 must be a positive"):
        evaluate(tiny, tok, "arc_easy", limit=0)
    with pytest.raises(GradPrunerError, match="Give a task name"):
        evaluate(tiny, tok)


def test_data_lines_missing_fields_name_file_and_line(tiny, tok, tmp_path):
    good = {"question": "Q?", "answerKey": "A", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    path = write_jsonl(tmp_path / "arc.jsonl", [good, {"answerKey": "A", "choices": good["choices"]}, good,
                                                 {**good, "answerKey": "C"}])
    with pytest.raises(GradPrunerError) as err:
        evaluate(tiny, tok, "arc_easy", data=path, progress=False)
    assert f"{path} line 2 lacks the field 'question'" in str(err.value)
    assert f"{path} line 4 has answerKey 'C'" in str(err.value) and len(err.value.problems) == 2
    generic = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    with pytest.raises(GradPrunerError, match="qa.jsonl line 2 lacks the key 'completion'"):
        evaluate(tiny, tok, data=generic, progress=False)
    # A file of the task's own rows is evaluated whole (no split).
    ok = write_jsonl(tmp_path / "arc_ok.jsonl", [good, good])
    assert evaluate(tiny, tok, "arc_easy", data=ok, progress=False)["n"] == 2


def test_overlap_guard(tiny, tok, tmp_path):
    rows = qa_rows(10)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:6])
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[6:])
    overlapping_eval = write_jsonl(tmp_path / "eval_bad.jsonl", rows[4:])
    assert evaluate(tiny, tok, data=held_out, train_data=train, progress=False)["n"] == 4
    with pytest.raises(GradPrunerError, match=r"2 of the 6 evaluation examples of .*eval_bad.jsonl also appear in "
                                              r"the training data \(the first is evaluation example 1\)"):
        evaluate(tiny, tok, data=overlapping_eval, train_data=train, progress=False)
    a, b = Example("Q: x", " y"), Example("Q:  x", " y ")
    assert overlapping([a], [Example("Q: z", " y"), b]) == [1]  # whitespace-normalised pairs
    check_disjoint([a], [Example("Q: z", " y")], "test")
    with pytest.raises(GradPrunerError, match="1 of the 1 evaluation examples of test"):
        check_disjoint([a], [b], "test")


@needs_data
def test_overlap_guard_on_tasks(tiny, tok, tmp_path):
    with pytest.raises(GradPrunerError, match="train split of piqa"):
        evaluate(tiny, tok, "piqa", split="train")
    no_guard = evaluate(tiny, tok, "piqa", split="train", limit=1, train_examples_guard=False, progress=False)
    assert no_guard["split"] == "train"
    # A user's training file that holds an ARC-Easy validation question.
    row = _rows("arc_easy", 1)[0]
    ex = TASKS["arc_easy"].to_example(row)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": ex.prompt, "completion": ex.completion}])
    with pytest.raises(GradPrunerError, match="1 of the 569 evaluation examples of arc_easy eval split"):
        evaluate(tiny, tok, "arc_easy", train_data=train)
    assert isinstance(EvalRow(TASKS["arc_easy"].to_choices(row), ex).item, MCItem)


# ------------------------------------------------------------- slow: lm-eval HFLM on SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from gradpruner.models.loading import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    return load_model(source), load_tokenizer(source)


@pytest.mark.slow
@needs_data
def test_agrees_with_lm_eval_hflm_on_smollm2(smollm2):
    hf = pytest.importorskip("lm_eval.models.huggingface", reason="lm-evaluation-harness is not installed")
    from lm_eval.api.instance import Instance

    from gradpruner.data.examples import load_task_rows
    from gradpruner.evaluation.evaluate import _eval_converter
    from gradpruner.evaluation.metrics import acc, acc_norm

    model, tok = smollm2
    lm = hf.HFLM(pretrained=model, tokenizer=tok, batch_size=16)
    for name in ("arc_easy", "piqa"):
        items = [r.item for r in load_task_rows(name, "eval", _eval_converter(TASKS[name]), DATA_DIR)[:20]]
        requests = [Instance("loglikelihood", {}, (c, k), j) for it in items for j, (c, k) in
                    enumerate(zip(it.contexts, it.continuations))]
        flat = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
        theirs = [[next(flat) for _ in it.contexts] for it in items]
        for method in ("packed", "cache"):
            ours = score_choices(model, tok, items, batch_size=8, progress=False, method=method)
            diff = max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t))
            assert diff <= 1e-3, (name, method, diff)
            for fn in (acc, acc_norm):
                assert [fn(o, it) for o, it in zip(ours, items)] == [fn(t, it) for t, it in zip(theirs, items)]
            print(f"{name} ({method}): max |Δ loglik| = {diff:.2e}, "
                  f"acc = {sum(acc(o, it) for o, it in zip(ours, items)) / len(items):.2f}")
