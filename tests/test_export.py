"""gradpruner export --format gguf: a model folder as one GGUF file that llama.cpp (and transformers) load.

Expected values come from the safetensors folders only: the GGUF is read back with gguf's own reader and
with transformers' GGUF loader (which undoes llama.cpp's conversions independently of the exporter), and
its logits are compared with the folder's. Measured on these tiny random models (4 architectures × 4 seeds,
2 × 12 positions; max |Δlogit| relative to max |logit|, and ‖Δ‖/‖logits‖): f32 0 (bit-identical), f16 ≤ 1.8e-3
and ≤ 1.3e-3, q8_0 ≤ 4.0e-2 and ≤ 3.2e-2 with argmax agreement ≥ 0.92 (random tiny models have near ties).
The bounds below leave 2.5-3× headroom.
"""
import itertools
import json
import math
import re

import gguf
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIGS, make_tiny_moe
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from gradpruner import api
from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.export import export_gguf
from gradpruner.export.gguf_arch import rotary_rows
from gradpruner.export.gguf_file import storage_type
from gradpruner.export.gguf_vocab import read_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 384  # the tiny models' embedding rows: the trained tokenizers below have fewer tokens, padded to this
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024 and we'll count 12345 apples!",
          "Hello world, hello there: naïve café, Über straße. Numbers 3.14 and 42 and 7.",
          "Q: what is item 12?\nA: red blue green\n\nQ: what's next?\nA: the end of the line."] * 20
TEXTS = ["Hello world! It's 2024: 12345 apples, naïve café.\n  spaced", "Q: what is item 7?\nA: red", "中文 ☃ ok"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "qwen2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "whitespace": lambda: pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def byte_bpe(folder, style: str = "smollm"):
    """A trained byte-level BPE split like ``style``, ChatML specials; BOS <|im_start|> is not added (as SmolLM2)."""
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama-bpe"))
    tok.pre_tokenizer = BYTE_LEVEL[style]()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=VOCAB - 4, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    fast.save_pretrained(str(folder))
    return fast


def spm_bpe(folder):
    """A Gemma-style SentencePiece BPE: spaces as '▁', byte fallback tokens <0x00>..<0xFF>, <bos> added."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", "\u2581")
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=VOCAB - 264, show_progress=False))
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for text, _ in sorted(base.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(m) for m in json.loads(base.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def _gemma3_types(n):
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


# What the released models of each family look like: Qwen2.5/Qwen3 do not use sliding windows (llama.cpp
# runs them with full attention everywhere), Qwen3's head_dim is its config default (transformers' GGUF loader
# does not read it back), Gemma 3 has the period-6 layout and query_pre_attn_scalar == head_dim (both fixed in
# llama.cpp).
SETUP = {
    "llama": ("smollm", {}),
    "qwen2": ("qwen2", {"use_sliding_window": False}),
    "qwen3": ("qwen2", {"use_sliding_window": False, "head_dim": 128}),
    "gemma3_text": ("spm", {"head_dim": 256, "query_pre_attn_scalar": 256}),
}


def make_folder(path, arch: str, seed: int = 0):
    style, over = SETUP[arch]
    config = TINY_CONFIGS[arch](8)
    config.vocab_size = VOCAB
    for key, value in over.items():
        setattr(config, key, value)
    if arch != "llama":
        config.layer_types = _gemma3_types(8) if arch == "gemma3_text" else ["full_attention"] * 8
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().save_pretrained(str(path))
    spm_bpe(path) if style == "spm" else byte_bpe(path, style)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_folder(tmp_path_factory.mktemp("export") / arch, arch)
        return made[arch]
    return get


def _logits(model_dir, gguf_file=None, seed=0):
    kwargs = {"gguf_file": gguf_file.name} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent if gguf_file else model_dir), dtype=torch.float32,
                                                 **kwargs).eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))  # 12 > sliding window 4
    with torch.no_grad():
        return model(ids).logits


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}, reader


# --- units -------------------------------------------------------------------------------------------

def test_storage_types_follow_llama_cpps_converter():
    assert storage_type("blk.0.attn_q.weight", (64, 64), "f32") == gguf.GGMLQuantizationType.F32
    assert storage_type("blk.0.attn_q.weight", (64, 64), "f16") == gguf.GGMLQuantizationType.F16
    assert storage_type("blk.0.attn_q.weight", (64, 64), "q8_0") == gguf.GGMLQuantizationType.Q8_0
    assert storage_type("blk.0.attn_q.weight", (64, 48), "q8_0") == gguf.GGMLQuantizationType.F16  # 48 % 32 != 0
    for name, shape in [("blk.0.attn_norm.weight", (64,)), ("blk.0.attn_q.bias", (64,)), ("output_norm.weight", (64,))]:
        assert storage_type(name, shape, "q8_0") == gguf.GGMLQuantizationType.F32


def test_rotary_rows_are_what_transformers_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(96 * 5, dtype=np.float32).reshape(96, 5)  # 6 heads of 16 rows, or 2 kv heads of 48
    undo = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    for heads in (6, 2):
        back = undo._reverse_permute_weights(rotary_rows(w, heads), 6, heads)
        np.testing.assert_array_equal(back, w)
    assert not np.array_equal(rotary_rows(w, 6), w)


@pytest.mark.parametrize("style", ["smollm", "gpt-2", "qwen2", "llama-bpe"])
def test_pre_tokenizer_is_named_by_how_it_splits(tmp_path, style):
    byte_bpe(tmp_path, style)
    vocab = read_vocab(tmp_path, VOCAB)
    assert (vocab.model, vocab.pre) == ("gpt2", style)
    assert len(vocab.tokens) == len(vocab.types) == VOCAB and vocab.merges
    assert vocab.tokens[-1] == f"[PAD{VOCAB - 1}]" and vocab.types[-1] == gguf.TokenType.UNUSED
    assert vocab.types[:3] == [gguf.TokenType.CONTROL] * 3 and vocab.special == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert not vocab.add_bos and not vocab.add_eos and "<|im_start|>" in vocab.chat_template


def test_unknown_pre_tokenizer_is_one_clear_error(tmp_path):
    byte_bpe(tmp_path, "whitespace")
    with pytest.raises(GradPrunerError, match="splits text before merging in a way gradpruner cannot name"):
        read_vocab(tmp_path, VOCAB)


def _spm_encode(text, tokens, scores, types):
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), on text without added tokens: repeatedly merge the
    adjacent pair whose joined text is the highest-scoring token (leftmost on ties), then spell what is not a token
    in byte tokens."""
    index = {t: i for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.BYTE)}
    symbols = list(text.replace(" ", "\u2581"))
    while True:
        pairs = [(scores[index[a + b]], -i) for i, (a, b) in enumerate(itertools.pairwise(symbols)) if a + b in index]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [j for s in symbols for j in ([index[s]] if s in index else [index[f"<0x{b:02X}>"] for b in s.encode()])]


def test_sentencepiece_scores_merge_like_the_folders_tokenizer(tmp_path):
    tok = spm_bpe(tmp_path)
    vocab = read_vocab(tmp_path, VOCAB)
    assert (vocab.model, vocab.pre, vocab.add_bos, vocab.add_space_prefix) == ("llama", "default", True, False)
    assert vocab.types[4:260] == [gguf.TokenType.BYTE] * 256
    for text in TEXTS + CORPUS[:3]:
        assert _spm_encode(text, vocab.tokens, vocab.scores, vocab.types) == tok(text, add_special_tokens=False)["input_ids"]


# --- the file, read back -----------------------------------------------------------------------------

BOUNDS = {"f16": 5e-3, "q8_0": 0.1}  # max |Δlogit| / max |logit|; f32: max |Δlogit| < 1e-4


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", sorted(SETUP))
def test_transformers_gguf_loader_gives_the_folders_logits(folder, tmp_path, arch, kind):
    out = tmp_path / "model.gguf"
    res = export_gguf(folder(arch), out, kind)
    assert res["layers"] == 8 and out.is_file()
    want, got = _logits(folder(arch)), _logits(None, out)
    diff = (want - got).abs().max().item()
    if kind == "f32":
        assert diff < 1e-4
    else:
        assert diff / want.abs().max().item() < BOUNDS[kind]
    if kind == "q8_0":
        assert ((want - got).norm() / want.norm()).item() < 0.08
        assert (want.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.75


@pytest.mark.parametrize("arch", sorted(SETUP))
def test_transformers_gguf_tokenizer_encodes_like_the_folders(folder, tmp_path, arch):
    out = tmp_path / "model.gguf"
    export_gguf(folder(arch), out, "f16")
    mine = AutoTokenizer.from_pretrained(str(folder(arch)))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == mine(text)["input_ids"]
    _, reader = _fields(out)
    output = [t.name for t in reader.tensors if t.name == "output.weight"]
    assert bool(output) == (not AutoModelForCausalLM.from_pretrained(str(folder(arch))).config.tie_word_embeddings)


def _check_per_layer(path, kept: int) -> dict:
    fields, reader = _fields(path)
    arch = fields["general.architecture"]
    assert fields[f"{arch}.block_count"] == kept
    arrays = {k: v for k, v in fields.items() if isinstance(v, list) and not k.startswith("tokenizer.")}
    assert arrays and all(len(v) == kept for v in arrays.values()), {k: len(v) for k, v in arrays.items()}
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    assert blocks == set(range(kept))
    return fields


def test_pruned_and_merged_llama_exports_its_kept_layers(folder, tiny_scores, tmp_path):
    plan = api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", prune=3, merge=1)
    api.prune(str(folder("llama")), tmp_path / "plan.json", tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    assert main(["export", "--model", str(tmp_path / "pruned"), "--type", "f32", "--out", str(out)]) == 0
    fields = _check_per_layer(out, 5)
    assert fields["gradpruner.kept_layers"] == plan["keep"] and fields["gradpruner.source_block_count"] == 8
    assert (_logits(tmp_path / "pruned") - _logits(None, out)).abs().max().item() < 1e-4


def test_pruned_gemma3_keeps_one_sliding_pattern_entry_per_kept_layer(folder, tmp_path):
    api.prune(str(folder("gemma3_text")), {"num_layers": 8, "keep": [0, 1, 2, 3, 4, 5], "drop": [6, 7]},
              tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    export_gguf(tmp_path / "pruned", out, "f16")
    fields = _check_per_layer(out, 6)
    types = json.loads((tmp_path / "pruned" / "config.json").read_text())["layer_types"]
    assert fields["gemma3.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in types]
    assert fields["gemma3.attention.sliding_window"] == 4
    want, got = _logits(tmp_path / "pruned"), _logits(None, out)
    assert (want - got).abs().max().item() / want.abs().max().item() < BOUNDS["f16"]


def test_pruned_gemma3_that_llama_cpp_would_misread_is_refused(folder, tmp_path):
    api.prune(str(folder("gemma3_text")), {"num_layers": 8, "keep": [1, 2, 3, 4, 5, 7], "drop": [0, 6]},
              tmp_path / "pruned")
    with pytest.raises(GradPrunerError, match=r"layer 4 uses full attention and layer 5 uses sliding-window") as err:
        export_gguf(tmp_path / "pruned", tmp_path / "x.gguf")
    assert "every 6th layer" in str(err.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_sliding_window_qwen_is_refused(tmp_path):
    config = TINY_CONFIGS["qwen2"](8)  # layers 4-7 sliding: llama.cpp's qwen2 has no sliding window
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "m"))
    byte_bpe(tmp_path / "m", "qwen2")
    with pytest.raises(GradPrunerError, match="full attention on every layer.*layers 4, 5, 6, 7 use sliding-window"):
        export_gguf(tmp_path / "m", tmp_path / "x.gguf")


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}


def _with_llama3_rope(config, theta: float = 500000.0):
    """Llama 3.1's rotary scaling, in either transformers' config spelling."""
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = {**LLAMA31_ROPE, "rope_theta": theta}
    else:
        config.rope_scaling, config.rope_theta = dict(LLAMA31_ROPE), theta
    return config


def test_llama31_rotary_scaling_is_written_as_llama_cpps_rope_freqs(tmp_path):
    config = _with_llama3_rope(TINY_CONFIGS["llama"](8))
    config.vocab_size = VOCAB
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "m"))
    byte_bpe(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16")
    _, reader = _fields(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    got = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    # Meta's Llama 3.1 rule, by hand: head_dim 16, theta 5e5, 8 frequencies; a wavelength below
    # 256 / 4 = 64 positions keeps its frequency, above 256 / 1 is divided by 8, in between smoothly.
    wavelengths = [2 * math.pi * 500000.0 ** (2 * i / 16) for i in range(8)]  # 6.3, 32.4, 167, 861, ...
    assert [round(w, 1) for w in wavelengths[:3]] == [6.3, 32.4, 167.1]
    smooth = (256 / wavelengths[2] - 1) / (4 - 1)
    want = [1.0, 1.0, 1 / ((1 - smooth) / 8 + smooth)] + [8.0] * 5
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert abs(want[2] - 3.5685) < 1e-3


def test_llama3_rotary_scaling_outside_llama_is_refused(tmp_path):
    config = _with_llama3_rope(TINY_CONFIGS["qwen2"](8))
    config.use_sliding_window, config.layer_types = False, ["full_attention"] * 8
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "m"))
    byte_bpe(tmp_path / "m", "qwen2")
    with pytest.raises(GradPrunerError, match="Rotary scaling 'llama3' is not supported .* for qwen2"):
        export_gguf(tmp_path / "m", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf"))


# --- bad input: one clear error each, exit 2, nothing written ----------------------------------------

def _cli_error(capsys, *argv) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("gradpruner: error:") == 1
    return err


def _no_output(tmp_path):
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".gguf") or ".gguf.tmp" in p.name]


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _cli_error(capsys, "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "m.gguf"))
    assert "does not exist" in _cli_error(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m.gguf"))
    _no_output(tmp_path)


@pytest.mark.parametrize("kind", ["gpt2", "mixtral"])
def test_unsupported_architecture(tmp_path, capsys, kind):
    if kind == "mixtral":
        make_tiny_moe("mixtral").save_pretrained(str(tmp_path / "m"))
    else:
        from transformers import GPT2Config
        AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(
            str(tmp_path / "m"))
    byte_bpe(tmp_path / "m")
    err = _cli_error(capsys, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf"))
    assert f"Model type '{kind}' cannot be exported to GGUF" in err and "gemma3_text, llama, qwen2, qwen3" in err
    _no_output(tmp_path)


def test_unknown_type_and_format(folder, tmp_path, capsys):
    err = _cli_error(capsys, "--model", str(folder("llama")), "--type", "q4_k", "--out", str(tmp_path / "m.gguf"))
    assert "Unknown GGUF tensor type 'q4_k'; choose one of: f16, f32, q8_0" in err
    err = _cli_error(capsys, "--model", str(folder("llama")), "--format", "onnx", "--out", str(tmp_path / "m.gguf"))
    assert "Unknown export format 'onnx'; choose one of: gguf" in err
    _no_output(tmp_path)


def test_existing_out_needs_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    err = _cli_error(capsys, "--model", str(folder("llama")), "--out", str(out))
    assert "already exists; choose another path or pass --overwrite" in err and out.read_bytes() == b"keep me"
    assert main(["export", "--model", str(folder("llama")), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and "wrote" in capsys.readouterr().out


def test_a_failure_while_writing_leaves_no_file(folder, tmp_path, monkeypatch):
    from gradpruner.export import gguf_file

    def fail(*args):
        raise GradPrunerError("stop")
    monkeypatch.setattr(gguf_file, "_write_tensors", fail)
    with pytest.raises(GradPrunerError, match="stop"):
        export_gguf(folder("llama"), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_a_gguf_copied_elsewhere_reuses_its_conversion(folder, tmp_path, monkeypatch):
    """The conversion cache follows the file's content, not its path or mtime: a reinstall adds no second copy."""
    import os
    import shutil

    from gradpruner.models.loading import resolve_model

    monkeypatch.setenv("GRADPRUNER_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    export_gguf(folder("llama"), first, "f32")
    converted = resolve_model(first)
    stamp = (converted / "config.json").stat().st_mtime_ns
    copy = tmp_path / "b" / "model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, ns=(1, 1))
    assert resolve_model(copy) == converted and (converted / "config.json").stat().st_mtime_ns == stamp
    other = tmp_path / "c" / "model.gguf"
    other.parent.mkdir()
    export_gguf(make_folder(tmp_path / "other", "llama", seed=1), other, "f32")
    assert resolve_model(other) != converted
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


def test_a_block_plan_exports_where_each_layers_mlp_came_from(folder, tmp_path):
    plan = {"num_layers": 8, "keep": [0, 1, 3, 4, 6, 7], "drop": [2, 5], "mlp_from": {"1": 2, "4": 5}}
    api.prune(str(folder("llama")), plan, tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    export_gguf(tmp_path / "pruned", out, "f32")
    fields = _check_per_layer(out, 6)
    assert fields["gradpruner.kept_layers"] == [0, 1, 3, 4, 6, 7]
    assert fields["gradpruner.kept_mlp_layers"] == [0, 2, 3, 5, 6, 7]
    assert "**MLP blocks moved**" in (tmp_path / "pruned" / "README.md").read_text()
    assert "1 ← 2, 4 ← 5" in (tmp_path / "pruned" / "README.md").read_text()
    assert (_logits(tmp_path / "pruned") - _logits(None, out)).abs().max().item() < 1e-4
