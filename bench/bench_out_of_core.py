"""Out-of-core pruning on a checkpoint of several GB: peak memory of `gradpruner prune` streaming
(the default) vs loading the model (`--in-memory`), and the two outputs compared tensor by tensor.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_out_of_core.py [--work DIR] [--layers 16] [--keep-files]

The input is a randomly initialised Llama (hidden 2048, MLP 5632, 16 heads, SmolLM2's tokenizer and
vocabulary, untied head; 16 layers ≈ 4.0 GB in float32) written straight to 500 MB safetensors shards,
never held in memory whole. The plan removes 6 layers and merges 2 of them (sign_sum, density 0.2)
with random IGIA factors. Each prune runs as its own command under `/usr/bin/time -v`, whose
"Maximum resident set size" is the peak RSS reported. Needs ≈ 3× the checkpoint size on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from gradpruner.models.loading import resolve_model, tensor_files
from gradpruner.pruning.streamed import meta_model


def make_checkpoint(folder: Path, layers: int, shard_bytes: int = 500 * 10**6) -> int:
    """Random weights, written shard by shard; returns the checkpoint's bytes."""
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=49152, tie_word_embeddings=False, dtype="float32")
    shapes = {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        n = 4 * torch.Size(shape).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            shape = shapes[name]
            tensors[name] = (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02)
            weight_map[name] = fname
            total += tensors[name].numel() * 4
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    smol = resolve_model("smollm2-135m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / f, folder / f)
    return total


def make_plan(work: Path, layers: int) -> Path:
    drop = list(range(layers // 2 - 3, layers // 2 + 3))
    keep = [i for i in range(layers) if i not in drop]
    merge = {str(drop[0]): drop[0] - 1, str(drop[-1]): drop[-1] + 1}
    factors, gen = {}, torch.Generator().manual_seed(1)
    mods = {"self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (2048, 2048), "self_attn.v_proj": (2048, 2048),
            "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (5632, 2048), "mlp.up_proj": (5632, 2048),
            "mlp.down_proj": (2048, 5632)}
    for src in merge:
        for rel, (out_f, in_f) in mods.items():
            name = f"model.layers.{src}.{rel}"
            factors[f"{name}.grad_A"] = torch.randn(4, 8, in_f, generator=gen) * 1e-3
            factors[f"{name}.grad_B"] = torch.randn(4, out_f, 8, generator=gen) * 1e-3
    save_file(factors, str(work / "igia.safetensors"))
    plan = {"num_layers": layers, "keep": keep, "drop": drop, "merge": merge}
    (work / "plan.json").write_text(json.dumps(plan))
    return work / "plan.json"


def timed_prune(model: Path, plan: Path, out: Path, flag: str) -> dict:
    gp = Path(sys.executable).with_name("gradpruner")
    cmd = ["/usr/bin/time", "-v", str(gp), "prune", "--model", str(model), "--plan", str(plan), "--out", str(out),
           "--igia", str(plan.with_name("igia.safetensors")), flag, "--max-shard-size", "500MB"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"flag": flag, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}


def tensors_equal(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ), one tensor in memory at a time."""
    wa, wb = tensor_files(a), tensor_files(b)
    differ = 0
    for name in wa:
        with safe_open(str(wa[name]), "pt") as fa, safe_open(str(wb[name]), "pt") as fb:
            differ += not torch.equal(fa.get_tensor(name), fb.get_tensor(name))
    return len(wa), differ


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gp-ooc-"))
    try:
        t = time.perf_counter()
        size = make_checkpoint(work / "model", args.layers)
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list((work / 'model').glob('*.safetensors')))} shards "
              f"({time.perf_counter() - t:.0f} s to write)", flush=True)
        plan = make_plan(work, args.layers)
        runs = [timed_prune(work / "model", plan, work / "streamed", "--out-of-core"),
                timed_prune(work / "model", plan, work / "loaded", "--in-memory")]
        n, differ = tensors_equal(work / "loaded", work / "streamed")
        res = {"checkpoint_gb": round(size / 1e9, 2), "checkpoint_mb": round(size / 2**20, 1), "runs": runs,
               "tensors_compared": n, "tensors_differing": differ}
        for r in runs:
            r["peak_over_checkpoint"] = round(r["peak_rss_mb"] / res["checkpoint_mb"], 3)
        print(json.dumps(res, indent=2))
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
