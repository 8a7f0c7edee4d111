"""Test helpers shared by several test modules (no network, no model downloads)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, TrainerCallback

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


def offline_data_dir() -> Path | None:
    """The folder holding every task's offline files, or None.

    It is $GRADPRUNER_DATA_DIR, which conftest.py points at ../shared/data beside the repository when
    that folder exists; tests marked ``needs_data`` read it (and skip, or fail under CI, without it).
    """
    import os

    from gradpruner.data.tasks import TASKS

    env = os.environ.get("GRADPRUNER_DATA_DIR")
    if not env:
        return None
    root = Path(env)
    files = [rel for spec in TASKS.values() for rel in spec.train_files + spec.eval_files]
    return root if all((root / rel).is_file() for rel in files) else None


def make_tiny_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, 259 ids) that encodes any text.

    It is a BPE model with the 256 byte symbols and no merges, so nothing is ever unknown.  Like
    Llama-style tokenizers it prepends "<s>" when add_special_tokens=True; "</s>" is EOS and "<pad>"
    is the pad token.  With ``save_dir`` it is also saved there (AutoTokenizer can load it back).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


# --- Tiny random causal LMs (built from configs only; no downloads) -------------------------------

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

_COMMON = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=300, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)  # ids of make_tiny_tokenizer
# Gemma 3 with an explicit mix: removing layers [1, 4, 5] keeps full, full, sliding, which a
# position rule would not reproduce.
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                      "full_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _layer_count(kwargs: dict, num_layers: int) -> dict:
    kwargs = {**_COMMON, **kwargs, "num_hidden_layers": num_layers}
    if "layer_types" in kwargs:
        types = kwargs["layer_types"]
        kwargs["layer_types"] = [types[i % len(types)] for i in range(num_layers)]
    return kwargs


def _config(class_name: str, **kwargs):
    def make(num_layers: int = 8):
        return getattr(transformers, class_name)(**_layer_count(kwargs, num_layers))
    make.class_name = class_name
    return make


_ALL_CONFIGS = {
    "llama": _config("LlamaConfig", tie_word_embeddings=True),
    "mistral": _config("MistralConfig", sliding_window=4, tie_word_embeddings=False),
    # Layers 0-3 full attention, 4-7 sliding (max_window_layers=4).
    "qwen2": _config("Qwen2Config", use_sliding_window=True, sliding_window=4, max_window_layers=4,
                     tie_word_embeddings=False),
    "qwen3": _config("Qwen3Config", head_dim=16, use_sliding_window=True, sliding_window=4,
                     max_window_layers=4, tie_word_embeddings=False),
    "gemma3_text": _config("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                           layer_types=GEMMA3_LAYER_TYPES, tie_word_embeddings=True),
    # Default Gemma 2 layer types alternate sliding (even) / full (odd).
    "gemma2": _config("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                      tie_word_embeddings=True),
    "phi3": _config("Phi3Config", tie_word_embeddings=False),
}
TINY_CONFIGS = {arch: make for arch, make in _ALL_CONFIGS.items() if hasattr(transformers, make.class_name)}


def make_tiny_model(arch: str, seed: int = 0, num_layers: int = 8) -> transformers.PreTrainedModel:
    """A tiny random float32 causal LM of architecture ``arch`` (a TINY_CONFIGS key), in eval mode."""
    config = TINY_CONFIGS[arch](num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0, num_layers: int = 8) -> Path:
    """A tiny model folder with its tokenizer, as a user's local HF checkpoint would be."""
    path = Path(path)
    make_tiny_model(arch, seed, num_layers).save_pretrained(str(path))
    make_tiny_tokenizer(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return Path(path)


def qa_rows(n: int = 40) -> list[dict]:
    """Generic prompt/completion data the tiny models can train on."""
    words = ["red", "blue", "green", "cold", "warm", "fast", "slow", "tall"]
    return [{"prompt": f"Q: what is item {i}?\nA:", "completion": f" {words[i % 8]} {words[(3 * i) % 8]}"} for i in range(n)]


# --- Tiny random mixture-of-experts causal LMs (tests/test_moe.py) ------------------------------
# Kept apart from TINY_CONFIGS: the tests iterating over those (e.g. analytic costs in test_bench)
# count dense MLPs. 4 experts, 2 per token; fused 3D experts in transformers 5.
_MOE = dict(num_experts_per_tok=2, intermediate_size=96)
_MOE_CONFIGS = {
    "mixtral": _config("MixtralConfig", num_local_experts=4, sliding_window=None, tie_word_embeddings=False, **_MOE),
    # Layer 2 is a dense MLP (mlp_only_layers); the others have 4 experts and a shared expert.
    "qwen2_moe": _config("Qwen2MoeConfig", num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                         decoder_sparse_step=1, mlp_only_layers=[2], tie_word_embeddings=False, **_MOE),
    "qwen3_moe": _config("Qwen3MoeConfig", num_experts=4, moe_intermediate_size=32, head_dim=16,
                         tie_word_embeddings=False, **_MOE),
}
MOE_CONFIGS = {arch: make for arch, make in _MOE_CONFIGS.items() if hasattr(transformers, make.class_name)}


def make_tiny_moe(arch: str, seed: int = 0, num_layers: int = 8) -> transformers.PreTrainedModel:
    """A tiny random float32 MoE causal LM of architecture ``arch`` (a MOE_CONFIGS key), in eval mode."""
    config = MOE_CONFIGS[arch](num_layers)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out



class Interrupt(TrainerCallback):
    """Simulates Ctrl-C right after the checkpoint of step ``at`` was written."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt
