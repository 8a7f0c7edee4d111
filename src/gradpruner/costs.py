"""What a model costs: parameters, FLOPs per token, and the wall time and peak memory of a stage."""
from __future__ import annotations

import contextlib
import resource
import threading
import time
from dataclasses import dataclass

import torch

from .architectures import find_decoder_layers


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


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb, 1)}


@contextlib.contextmanager
def measure(interval: float = 0.05):
    """Wall time and peak resident memory of the block (sampled), and peak GPU memory if any."""
    usage = Usage(peak_rss_mb=_rss_mb())
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            usage.peak_rss_mb = max(usage.peak_rss_mb, _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    thread.start()
    try:
        yield usage
    finally:
        stop.set()
        thread.join()
        usage.seconds = time.perf_counter() - start
        usage.peak_rss_mb = max(usage.peak_rss_mb, _rss_mb())
        if torch.cuda.is_available():
            usage.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


@torch.no_grad()
def latency(model, seq: int = 128, batch: int = 1, new_tokens: int = 16, reps: int = 3) -> dict:
    """Median prefill seconds for ``batch``×``seq`` tokens, and decode tokens/s with the KV cache.

    Decode speed = new tokens / (time of a cached greedy generate of ``new_tokens`` − one prefill).
    """
    import statistics

    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    pad = model.config.eos_token_id
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    model.eval()
    prefill, total = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, use_cache=True, pad_token_id=pad)
        total.append(time.perf_counter() - t0)
    p, t = statistics.median(prefill), statistics.median(total)
    return {"seq": seq, "batch": batch, "new_tokens": new_tokens, "prefill_s": p,
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(t - p, 1e-9)}
