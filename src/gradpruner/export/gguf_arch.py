"""What llama.cpp needs to know about each architecture gradpruner writes to GGUF.

One ``Arch`` per Hugging Face ``model_type``: llama.cpp's architecture name, how a tensor's values
change on the way (the rotary row order of Llama's q/k projections, Gemma's ``1 + w`` norms), and the
attention layout llama.cpp's graph assumes. llama.cpp does not read the attention kind of each layer
from the file for these architectures: Llama and Qwen2/3 attend fully on every layer, and Gemma 3
makes every sixth layer global and the others sliding, with a fixed rotary base of 10000 on the
sliding ones (``llama_hparams::set_swa_pattern(6)`` in llama-model.cpp). A pruned model whose kept
layers break that rule would load and compute something else, so ``problems`` refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from gradpruner.errors import GradPrunerError

FULL, SLIDING = "full_attention", "sliding_attention"
GEMMA3_SWA_PERIOD = 6  # llama.cpp: layer i is sliding unless (i + 1) % 6 == 0
GEMMA3_SWA_ROPE_BASE = 10000.0  # llama.cpp's fixed rotary base of Gemma 3's sliding layers
GEMMA3_27B_LAYERS = 62  # the one Gemma 3 size whose attention scale llama.cpp takes from n_embd / n_head


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    rotary_rows: bool  # llama.cpp's LLAMA graph rotates interleaved pairs: q/k rows reordered per head
    norm_offset: float  # Gemma scales by (1 + w), llama.cpp's graph by w: add this to every norm weight
    swa_period: int | None  # llama.cpp's fixed sliding pattern; None: full attention on every layer

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, True, 0.0, None),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, False, 0.0, None),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, False, 0.0, None),
    "gemma3_text": Arch(gguf.MODEL_ARCH.GEMMA3, False, 1.0, GEMMA3_SWA_PERIOD),
}


def arch_for(config) -> Arch:
    """The ``Arch`` of a config, or one clear error naming the supported model types."""
    kind = getattr(config, "model_type", None)
    if kind in ARCHS:
        return ARCHS[kind]
    hint = (" (the image-text Gemma 3; export a text-only gemma3_text model)" if kind == "gemma3" else "")
    raise GradPrunerError(f"Model type {kind!r}{hint} cannot be exported to GGUF by gradpruner; "
                          f"supported: {', '.join(sorted(ARCHS))}.")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config) -> list[str]:
    """The attention kind of every layer of the (pruned) config: its ``layer_types``, else full everywhere."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    return list(types) if isinstance(types, (list, tuple)) and len(types) == n else [FULL] * n


def llama_cpp_layer_types(arch: Arch, config) -> list[str]:
    """The attention kind llama.cpp will give every layer of a file with this config's layer count."""
    n = config.num_hidden_layers
    if arch.swa_period is None or not getattr(config, "sliding_window", None):
        return [FULL] * n
    return [FULL if (i + 1) % arch.swa_period == 0 else SLIDING for i in range(n)]


def rope(config, kind: str = FULL) -> dict:
    """Rotary settings of the layers of attention ``kind``: ``rope_type``, ``rope_theta``, ``factor``
    (transformers 5 ``rope_parameters``, per layer kind for Gemma 3; or 4.x ``rope_theta``/``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(kind), dict):
        params = params[kind]
    if not isinstance(params, dict) or "rope_theta" not in params:
        if kind == SLIDING and getattr(config, "rope_local_base_freq", None):
            return {"rope_type": "default", "rope_theta": float(config.rope_local_base_freq)}
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return {**params, "rope_type": params.get("rope_type", params.get("type")) or "default"}


_WORDS = {FULL: "full attention", SLIDING: "sliding-window attention"}


def _layout_problem(arch: Arch, have: list[str], want: list[str]) -> str | None:
    differ = [i for i, (a, b) in enumerate(zip(have, want)) if a != b]
    if not differ:
        return None
    rule = ("full attention on every layer" if arch.swa_period is None else
            f"a fixed layout, full attention on every {arch.swa_period}th layer and sliding-window attention on the others")
    groups = {kind: [str(i) for i in differ if have[i] == kind] for kind in (FULL, SLIDING)}
    uses = " and ".join(f"layer{'s' if len(ix) > 1 else ''} {', '.join(ix)} use{'' if len(ix) > 1 else 's'} {_WORDS[kind]}"
                        for kind, ix in groups.items() if ix)
    return (f"llama.cpp runs {arch.name} with {rule}, but in this model (layers numbered as in its folder) {uses}, "
            "so llama.cpp would compute something else; remove layers that keep llama.cpp's layout, or run the "
            "folder with transformers.")


def problems(arch: Arch, config) -> list[str]:
    """Why llama.cpp would compute something else than the folder's model (one sentence each), or []."""
    layout = _layout_problem(arch, layer_types(config), llama_cpp_layer_types(arch, config))
    out = [layout] if layout else []
    full = rope(config, FULL)
    known = ("default", "linear", "llama3") if arch.gguf_arch == gguf.MODEL_ARCH.LLAMA else ("default", "linear")
    if full["rope_type"] not in known:
        out.append(f"Rotary scaling {full['rope_type']!r} is not supported by gradpruner's GGUF export for "
                   f"{arch.name} (only {', '.join(known)}); convert this model with llama.cpp's own converter.")
    if arch.swa_period is not None:
        out += _gemma3_problems(config)
    return out


def _gemma3_problems(config) -> list[str]:
    out = []
    local = rope(config, SLIDING)
    if local["rope_type"] != "default" or float(local["rope_theta"]) != GEMMA3_SWA_ROPE_BASE:
        out.append(f"llama.cpp gives Gemma 3's sliding layers rotary base {GEMMA3_SWA_ROPE_BASE:g} without "
                   f"scaling, but this model uses {local['rope_theta']:g} ({local['rope_type']}); it cannot run "
                   "correctly in llama.cpp.")
    n, dim = config.num_hidden_layers, head_dim(config)
    theirs = config.hidden_size / config.num_attention_heads if n == GEMMA3_27B_LAYERS else dim
    ours = getattr(config, "query_pre_attn_scalar", None) or dim
    if abs(float(ours) - float(theirs)) > 1e-6:
        out.append(f"llama.cpp scales Gemma 3's attention by 1/sqrt({theirs:g}) for a model of {n} layers, but "
                   f"this model uses 1/sqrt({ours:g}) (query_pre_attn_scalar), so it cannot run correctly in "
                   "llama.cpp (a pruned Gemma 3 27B is such a model).")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "use_bidirectional_attention", False):
        out.append("llama.cpp's Gemma 3 has no attention logit soft-capping and no bidirectional attention, "
                   "which this model uses; it cannot run correctly in llama.cpp.")
    return out


def write_hparams(writer: gguf.GGUFWriter, arch: Arch, config) -> None:
    """The ``{arch}.*`` keys llama.cpp reads, from the (pruned) config."""
    dim = head_dim(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    full = rope(config, FULL)
    writer.add_rope_freq_base(float(full["rope_theta"]))
    if full["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if arch.rotary_rows:
        writer.add_rope_dimension_count(dim)
    if arch.swa_period is not None:
        _write_gemma3(writer, config)


def _write_gemma3(writer: gguf.GGUFWriter, config) -> None:
    window = getattr(config, "sliding_window", None)
    if window:
        writer.add_sliding_window(int(window))
    # One entry per kept layer. llama.cpp derives Gemma 3's layout from the fixed period instead (and
    # ``problems`` made sure the two agree); the array records the layout for readers that do use it.
    writer.add_array(f"{writer.arch}.attention.sliding_window_pattern", [t == SLIDING for t in layer_types(config)])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def rope_factors(config) -> np.ndarray | None:
    """Llama 3.1's rotary scaling as llama.cpp reads it, the tensor ``rope_freqs`` (each frequency's
    divisor: the plain inverse frequency over the scaled one that transformers computes), or None when
    the model has no such scaling."""
    if rope(config, FULL)["rope_type"] != "llama3":
        return None
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dim, base = head_dim(config), float(rope(config, FULL)["rope_theta"])
    plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaled = LlamaRotaryEmbedding(config).inv_freq.double()
    return (plain / scaled).float().numpy()


def rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (weight or bias) from transformers' rotary layout, whose two
    halves of each head are rotated together, to llama.cpp's, which rotates adjacent pairs."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_values(arch: Arch, config, name: str, w: np.ndarray) -> np.ndarray:
    """The float32 values llama.cpp expects under GGUF name ``name`` for transformers' ``w``."""
    if arch.rotary_rows and ".attn_q." in name:
        w = rotary_rows(w, config.num_attention_heads)
    elif arch.rotary_rows and ".attn_k." in name:
        w = rotary_rows(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch.norm_offset and name.endswith("norm.weight"):
        w = w + np.float32(arch.norm_offset)
    return w
