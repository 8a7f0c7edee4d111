"""A model folder's tokenizer as GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``).

Two kinds of tokenizer are written, read from the folder's fast tokenizer (tokenizer.json):

- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2/3) as ``tokenizer.ggml.model = "gpt2"``, with
  its merges and ``tokenizer.ggml.pre``, the name of the rule llama.cpp splits text with before
  merging. The rule is found by behaviour: the folder's pre-tokenizer and each candidate split a probe
  text, and the candidate that splits it identically names it (``PRE_TOKENIZERS``). A vocabulary without
  merges gives the same tokens under any split, and is written with llama.cpp's ``default``.
- SentencePiece-style BPE (Gemma: spaces written as "▁", byte fallback) as ``"llama"``, which llama.cpp
  merges by token score: a token made by a merge scores minus that merge's rank, so the highest-scoring
  pair is the merge the folder's tokenizer would apply first. ``pre`` is ``default`` (unused there).

Tokens get llama.cpp's types (control for special added tokens, user-defined for the other added
tokens, byte for ``<0xXX>``), and the list is padded with ``[PADn]`` tokens to the model's vocab size,
as the embedding matrix has that many rows.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFWriter, TokenType

from gradpruner.errors import GradPrunerError

# Letters with and without case, contractions in both cases, digit runs of several lengths, punctuation
# glued to words, several kinds of whitespace and newlines, non-Latin scripts.
PROBE = ("Hello world! IT'S we'll 2024: 12345 apples,3.14 -- naïve CAFÉ?!abc\n\n  spaced   out\ttab\r\n"
         " x\n\n\ny Über 中文字 ？ ok...  ")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _pre_tokenizers() -> dict[str, tuple[object, bool]]:
    """llama.cpp's name of a pre-tokenizer -> (an equivalent `tokenizers` pre-tokenizer, whether llama.cpp
    then ignores merges for a word that is itself a token, as it does for ``llama-bpe``)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt
    from transformers.models.qwen2.tokenization_qwen2 import (
        PRETOKENIZE_REGEX as qwen2_split,
    )

    def split(pattern):
        return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "gpt-2": (pt.ByteLevel(add_prefix_space=False, use_regex=True), False),
        "smollm": (pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
                   False),
        "qwen2": (split(qwen2_split), False),
        "llama-bpe": (split(_LLAMA3_SPLIT), True),
    }


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | list | None = None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _load(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GradPrunerError(f"Could not load the tokenizer of {folder} ({_first_line(exc)}); the folder needs its "
                              "tokenizer files (tokenizer.json, tokenizer_config.json).") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GradPrunerError(f"The tokenizer of {folder} is not a fast tokenizer; save it with tokenizer.json "
                              "(AutoTokenizer.from_pretrained(...).save_pretrained(folder)) and export again.")
    return tok, backend, json.loads(backend.to_str())


def _nodes(node):
    """A normalizer or pre-tokenizer and, for a Sequence, its members."""
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or []
    return [node] + [n for sub in inner for n in _nodes(sub)]


def _kind(data: dict) -> str | None:
    if data.get("model", {}).get("type") != "BPE":
        return None
    if any(n.get("type") == "ByteLevel" for n in _nodes(data.get("pre_tokenizer")) + [data.get("decoder") or {}]):
        return "gpt2"
    spm = [n for n in _nodes(data.get("normalizer")) + _nodes(data.get("pre_tokenizer"))
           if n.get("type") == "Metaspace" or SPM_SPACE in (n.get("content"), n.get("prepend"))]
    return "llama" if spm or data["model"].get("byte_fallback") else None


def _space_prefix(data: dict) -> bool:
    for n in _nodes(data.get("normalizer")):
        if n.get("type") == "Prepend" and n.get("prepend") == SPM_SPACE:
            return True
    for n in _nodes(data.get("pre_tokenizer")):
        if n.get("type") == "Metaspace" and n.get("prepend_scheme", "always" if n.get("add_prefix_space") else "never") != "never":
            return True
        if n.get("type") == "ByteLevel" and n.get("add_prefix_space"):
            return True
    return False


def _merges(data: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in data["model"].get("merges") or []]


def _pre_name(folder: Path, backend, data: dict, merges: list) -> str:
    if not merges:
        raise GradPrunerError(f"The tokenizer of {folder} is byte-level BPE without merges, and llama.cpp refuses such a "
                              "vocabulary (it requires tokenizer.ggml.merges); use a tokenizer with merges.")
    if backend.pre_tokenizer is None:
        got = [PROBE]
    else:
        got = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(PROBE)]
    ignore = bool(data["model"].get("ignore_merges"))
    for name, (candidate, ignores) in _pre_tokenizers().items():
        if ignores == ignore and [p for p, _ in candidate.pre_tokenize_str(PROBE)] == got:
            return name
    raise GradPrunerError(f"The tokenizer of {folder} splits text before merging in a way gradpruner cannot name for "
                          f"llama.cpp (it knows {', '.join(_pre_tokenizers())}); convert this model with llama.cpp's own "
                          "converter.")


def _token_table(folder: Path, data: dict, kind: str, vocab_size: int) -> tuple[list[str], list[int]]:
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    too_big = [i for i in data["model"]["vocab"].values() if i >= vocab_size]
    too_big += [t["id"] for t in data.get("added_tokens", []) if t["id"] >= vocab_size]
    if too_big:
        raise GradPrunerError(f"The tokenizer of {folder} has token id {max(too_big)}, but the model's vocab_size is "
                              f"{vocab_size}; the tokenizer does not belong to this model.")
    for text, i in data["model"]["vocab"].items():
        tokens[i] = text
        types[i] = int(TokenType.BYTE if kind == "llama" and _BYTE_TOKEN.fullmatch(text) else TokenType.NORMAL)
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    unk = data["model"]["vocab"].get(data["model"].get("unk_token"))
    if kind == "llama" and unk is not None and types[unk] == TokenType.NORMAL:
        types[unk] = int(TokenType.UNKNOWN)
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def spm_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """Scores under which merging the highest-scoring adjacent pair (llama.cpp's SentencePiece tokenizer)
    applies the merges in the folder's order: minus the rank of the first merge making each token."""
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    out = []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED, TokenType.UNKNOWN):
            out.append(-1000.0)
        elif text in rank:
            out.append(-float(rank[text]))
        else:  # a single character or byte (never the result of a merge), or a token no merge makes
            out.append(0.0 if kind == TokenType.BYTE or len(text) == 1 else -float(len(merges) + i))
    return out


def _flags(tok) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS to a text (as found by encoding one)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    extra = len(full) > len(plain)
    return (extra and tok.bos_token_id is not None and full[0] == tok.bos_token_id,
            extra and tok.eos_token_id is not None and full[-1] == tok.eos_token_id)


def read_vocab(folder: str | Path, vocab_size: int) -> Vocab:
    """The tokenizer of ``folder`` for a model with ``vocab_size`` embedding rows, or one clear error."""
    folder = Path(folder)
    tok, backend, data = _load(folder)
    kind = _kind(data)
    if kind is None:
        raise GradPrunerError(f"The tokenizer of {folder} is neither byte-level BPE (GPT-2 style) nor SentencePiece-style "
                              "BPE, the two kinds gradpruner writes for llama.cpp.")
    merges = _merges(data)
    spaced = any(" " in part for pair in merges for part in pair)  # GGUF stores a merge as "left right"
    if kind == "gpt2" and spaced:
        raise GradPrunerError(f"The tokenizer of {folder} has merges of tokens that contain spaces, which GGUF cannot "
                              "store for a byte-level vocabulary.")
    tokens, types = _token_table(folder, data, kind, vocab_size)
    special = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _flags(tok)
    return Vocab(
        model=kind, pre=_pre_name(folder, backend, data, merges) if kind == "gpt2" else "default",
        tokens=tokens, types=types,
        merges=[] if spaced else [f"{a} {b}" for a, b in merges],  # SentencePiece-style: llama.cpp merges by score
        scores=spm_scores(tokens, types, merges) if kind == "llama" else None,
        special={k: v for k, v in special.items() if isinstance(v, int) and 0 <= v < vocab_size},
        add_bos=add_bos, add_eos=add_eos, add_space_prefix=_space_prefix(data), chat_template=tok.chat_template or None)


def write_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        template = vocab.chat_template
        if isinstance(template, dict):
            template = [{"name": k, "template": v} for k, v in template.items()]
        writer.add_chat_template(template)
