"""What a model costs: parameters, FLOPs per token, inference latency, and the wall time and peak
memory of a stage."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import threading
import time
from dataclasses import dataclass

import torch

from gradpruner.models.architectures import cache_keyword, find_decoder_layers


def param_counts(model) -> dict:
    """Total parameters (tied weights once) and those inside the decoder layers."""
    _, _, layers = find_decoder_layers(model)
    unique = {id(p): p for p in model.parameters()}
    return {"total": sum(p.numel() for p in unique.values()),
            "decoder_layers": sum(p.numel() for p in layers.parameters()),
            "num_layers": len(layers)}


def flops_per_token(model, context: int = 256) -> dict:
    """Forward FLOPs for one token attending to ``context`` earlier tokens (2 FLOPs per MAC).

    Linear layers: every ``nn.Linear`` in the decoder layers plus the output head (each in×out MACs).
    Attention: QKᵀ and AV, 2 · context · heads · head_dim MACs per layer. Norms, activations and
    softmax are left out (a few per cent at most for these shapes).
    """
    _, _, layers = find_decoder_layers(model)
    linear = sum(m.in_features * m.out_features for m in layers.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    head_macs = head.in_features * head.out_features if isinstance(head, torch.nn.Linear) else 0
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(heads, 1)
    attn = len(layers) * 2 * context * heads * head_dim
    macs = linear + head_macs + attn
    return {"context": context, "macs": macs, "flops": 2 * macs, "decoder_linear_macs": linear,
            "head_macs": head_macs, "attention_macs": attn}


# Per model_type: norms per decoder layer, and whether q/k carry their own RMSNorm (of head_dim).
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4}
_QK_NORM = {"qwen3", "gemma3_text"}


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _shape(config) -> dict:
    """The sizes the formulas use, from a dense decoder-only config (Llama, Mistral, Qwen, Gemma, Phi-3)."""
    from gradpruner.errors import GradPrunerError

    cfg = _text_config(config)
    if any(getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise GradPrunerError(f"Model type {cfg.model_type!r} is a mixture of experts; analytic costs "
                              "cover dense decoder-only models only.")
    nh = cfg.num_attention_heads
    return {"type": cfg.model_type, "L": cfg.num_hidden_layers, "h": cfg.hidden_size, "nh": nh,
            "nkv": getattr(cfg, "num_key_value_heads", None) or nh,
            "d": getattr(cfg, "head_dim", None) or cfg.hidden_size // nh, "I": cfg.intermediate_size,
            "V": cfg.vocab_size, "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
            "attn_bias": bool(getattr(cfg, "attention_bias", False)), "mlp_bias": bool(getattr(cfg, "mlp_bias", False))}


def _bias_params(s: dict) -> int:
    """Qwen 2 has q/k/v biases whatever the config says; Mistral and Phi-3 none; others follow it."""
    qkv = (s["nh"] + 2 * s["nkv"]) * s["d"]
    if s["type"] == "qwen2":
        return qkv
    if s["type"] in ("mistral", "phi3"):
        return 0
    return (qkv + s["h"] if s["attn_bias"] else 0) + (2 * s["I"] + s["h"] if s["mlp_bias"] else 0)


def analytic_costs(config, seq_len: int) -> dict:
    """Parameters and forward MACs/FLOPs per token of a dense decoder-only LM, from its config alone.

    With L layers, hidden h, n_q query and n_kv key/value heads of size d, MLP width I, vocabulary V:

    - per layer, weights: attention h·n_q·d (q) + 2·h·n_kv·d (k, v, grouped-query) + n_q·d·h (o);
      MLP 3·h·I (gate, up, down); plus biases where the config has them and the norms (2·h, or 4·h
      for Gemma 2/3, + 2·d for Qwen 3 / Gemma 3 q/k norms);
    - model: embedding V·h, output head V·h unless tied (a tied head is counted once), final norm h;
    - MACs per token at sequence length S: every weight matrix once (the layers' linears and the
      head), plus attention QKᵀ and AV, 2·S·n_q·d per layer: every query against all S keys, as
      eager attention and FlopCounterMode count it (a causal kernel that skips the masked half does
      about half of that; a sliding window is not taken off). FLOPs = 2·MACs. Norms, rotary,
      activations, softmax and the residual adds are left out: O(h) per token against O(h²).
    """
    s = _shape(config)
    L, h, nh, nkv, d, inter, vocab = (s[k] for k in ("L", "h", "nh", "nkv", "d", "I", "V"))
    attn_w = h * nh * d + 2 * h * nkv * d + nh * d * h
    mlp_w = 3 * h * inter
    bias = _bias_params(s)
    norms = _NORMS_PER_LAYER.get(s["type"], 2) * h + (2 * d if s["type"] in _QK_NORM else 0)
    per_layer = attn_w + mlp_w + bias + norms
    embedding = vocab * h
    head = 0 if s["tied"] else vocab * h
    linear_macs = L * (attn_w + mlp_w)
    attention_macs = L * 2 * seq_len * nh * d
    head_macs = vocab * h
    macs = linear_macs + attention_macs + head_macs
    return {"seq_len": seq_len, "num_layers": L,
            "params": {"total": L * per_layer + embedding + head + h, "decoder_layers": L * per_layer,
                       "embedding": embedding, "head": head, "per_layer": per_layer},
            "decoder_linear_macs": linear_macs, "attention_macs": attention_macs, "head_macs": head_macs,
            "macs_per_token": macs, "flops_per_token": 2 * macs}


def rss_mb() -> float:
    """Resident set of this process now, MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_peak(device: str) -> str:
    """Reset the peak-memory counter of this process to now; returns how ``peak_mb`` will read it.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs
    after freed heap is handed back to the kernel (malloc_trim), so an earlier phase does not linger.
    CUDA: the allocator's peak of allocated bytes.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so earlier phases do not linger
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss (lifetime peak)"


def peak_mb(device: str, base: float = 0.0) -> float:
    """MiB at the peak since ``reset_peak``, minus ``base`` on CPU (e.g. the RSS before loading)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _hwm_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm - base


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb, 1)}


def _used_gpus() -> list[int]:
    """The CUDA devices whose allocator counters can be read: all of them once this process has used CUDA,
    none before (reading them would start CUDA in a process that never needed it)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def measure(interval: float = 0.05):
    """Wall time and peak resident memory of the block (sampled), and the peak memory of the busiest GPU the
    process used (None when it never touched CUDA): it observes whichever device the stage ran on."""
    usage = Usage(peak_rss_mb=rss_mb())
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            usage.peak_rss_mb = max(usage.peak_rss_mb, rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    for d in _used_gpus():
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    thread.start()
    try:
        yield usage
    finally:
        stop.set()
        thread.join()
        usage.seconds = time.perf_counter() - start
        usage.peak_rss_mb = max(usage.peak_rss_mb, rss_mb())
        gpus = _used_gpus()
        if gpus:
            usage.peak_gpu_mb = max(torch.cuda.max_memory_allocated(d) for d in gpus) / 2**20


def sync(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so a timer reads finished work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_ids(vocab: int, batch: int, seq: int, device: str) -> torch.Tensor:
    """[batch, seq] token ids drawn with a seed of the shape: the same inputs for every model."""
    gen = torch.Generator().manual_seed(batch * 100003 + seq)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


@torch.no_grad()
def infer_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s): one forward of ``ids`` that fills the KV cache and computes the logits
    of the last position only (as generation does), then ``new_tokens`` greedy cached steps."""
    device = str(ids.device)
    cache_kw = cache_keyword(model)
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=nxt, use_cache=True, **{cache_kw: getattr(out, cache_kw)})
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def latency(model, seq: int = 128, batch: int = 1, new_tokens: int = 16, reps: int = 3) -> dict:
    """Median prefill seconds for ``batch``×``seq`` tokens, and decode tokens/s with the KV cache:
    ``reps`` runs of ``infer_once`` (the measurement ``gradpruner bench`` alternates between models)."""
    import statistics

    device = str(next(model.parameters()).device)
    ids = random_ids(model.config.vocab_size, batch, seq, device)
    model.eval()
    runs = [infer_once(model, ids, new_tokens) for _ in range(reps)]
    prefill, decode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"seq": seq, "batch": batch, "new_tokens": new_tokens, "prefill_s": prefill,
            "decode_tokens_per_s": batch * new_tokens / max(decode, 1e-9)}
