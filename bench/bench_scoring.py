"""Scoring overhead: a peft LoRA optimizer step with IGIA capture vs the same step without it.

Same model, same batches, alternating plain/capture step by step so machine drift cancels.
Also the factor store's memory against the model's weight bytes, measured for the model here and
computed from shapes for Llama-3.1-8B. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_scoring.py --model smollm2-135m --steps 12
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from peft import LoraConfig, get_peft_model

from gradpruner.data.examples import PadCollator, load_examples, tokenize
from gradpruner.models import architectures
from gradpruner.models.loading import load_model, load_tokenizer, resolve_model
from gradpruner.scoring.capture import IGIACallback

LLAMA31_8B = dict(hidden=4096, kv=1024, inter=14336, layers=32, params=8.03e9)


def step(model, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss


def factor_bytes_per_step(shapes: list[tuple[int, int]], rank: int, item=4) -> int:
    return sum(rank * (i + o) for i, o in shapes) * item


def llama8b_shapes():
    h, kv, f = LLAMA31_8B["hidden"], LLAMA31_8B["kv"], LLAMA31_8B["inter"]
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out)
    return per_layer * LLAMA31_8B["layers"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--steps", type=int, default=12, help="steps of each kind (plus 1 warm-up each)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--T", type=int, default=40, help="scoring steps for the memory figures")
    a = ap.parse_args()
    torch.manual_seed(0)
    src = resolve_model(a.model)
    base, tok = load_model(src), load_tokenizer(src)
    names = architectures.linear_module_names(base)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in base.parameters()}.values())
    model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=32, target_modules=names, lora_dropout=0.0))
    model.train()
    feats = tokenize(load_examples(task=a.task, split="train"), tok)
    collate = PadCollator(tok.pad_token_id)
    batches = [collate(feats[i * a.batch_size:(i + 1) * a.batch_size]) for i in range(a.steps + 1)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        cb = IGIACallback(tmp, steps=2 * (a.steps + 1) + 1, model=model)
        cb.on_train_begin(SimpleNamespace(logging_nan_inf_filter=True), SimpleNamespace(is_world_process_zero=True), None)
        times = {"plain": [], "capture": [], "capture_call": []}
        for i, batch in enumerate(batches):
            for kind in ("plain", "capture"):
                t0 = time.perf_counter()
                step(model, opt, batch)
                if kind == "capture":
                    t1 = time.perf_counter()
                    cb.on_pre_optimizer_step(None, None, None)
                    if i > 0:
                        times["capture_call"].append(time.perf_counter() - t1)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i > 0:  # first pair is warm-up
                    times[kind].append(time.perf_counter() - t0)
        cb._abort()
    plain, cap = statistics.median(times["plain"]), statistics.median(times["capture"])
    shapes = [(m.in_features, m.out_features) for n, m in base.named_modules() if n in set(names)]
    per_step = factor_bytes_per_step(shapes, a.rank)
    l8 = llama8b_shapes()
    l8_step, l8_weights = factor_bytes_per_step(l8, a.rank, 2), LLAMA31_8B["params"] * 2
    l8_fullF = sum(i * o for i, o in l8) * 2
    print(f"model {a.model}: {len(names)} LoRA modules, r={a.rank}, batch {a.batch_size}, {a.steps} steps each, torch threads {torch.get_num_threads()}")
    call = statistics.median(times["capture_call"])
    print(f"step time median: plain {plain:.3f} s, with capture {cap:.3f} s, ratio {cap / plain:.3f}; "
          f"the capture call alone {call * 1000:.1f} ms = {call / plain:.2%} of a plain step")
    print("factor store (streamed to disk; memory holds one step's factors):")
    print(f"  {a.model}: in memory {per_step / 1e6:.1f} MB = {per_step / weight_bytes:.2%} of weights ({weight_bytes / 1e6:.0f} MB fp32); "
          f"on disk for T={a.T}: {a.T * per_step / 1e6:.0f} MB; naive full-size F matrices: {sum(i * o for i, o in shapes) * 4 / 1e6:.0f} MB")
    print(f"  Llama-3.1-8B (bf16, from shapes): in memory {l8_step / 1e6:.1f} MB = {l8_step / l8_weights:.3%} of weights; "
          f"on disk for T={a.T}: {a.T * l8_step / 1e9:.2f} GB; naive full-size F matrices: {l8_fullF / 1e9:.1f} GB "
          f"({l8_fullF / (a.T * l8_step):.0f}x the factor file)")


if __name__ == "__main__":
    main()
