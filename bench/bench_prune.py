"""Prune + merge cost on a real model: wall time by phase and peak memory against the model's size.

Each measurement runs in a fresh child process so ru_maxrss is that run's own peak; a child that
only imports gradpruner and torch gives the baseline to subtract. Run (after a score run):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_prune.py --model smollm2-135m --scores runs/demo/scores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from gradpruner import api
from gradpruner.models import architectures
from gradpruner.pruning.merging import merge_layers
from gradpruner.models.loading import load_model, load_tokenizer, resolve_model, save_model
from gradpruner.pruning.surgery import remove_layers
mode, model, plan_path, out = sys.argv[1:5]
res = {"import_s": time.perf_counter() - t0}
if mode == "full":
    plan = json.load(open(plan_path))
    t = time.perf_counter(); m = load_model(resolve_model(model)); tok = load_tokenizer(resolve_model(model))
    res["weight_mb"] = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values()) / 2**20
    res["load_s"] = time.perf_counter() - t; res["rss_after_load_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter(); merge_layers(m, plan["merge"], plan["igia"], 0.2, "sign_sum"); res["merge_s"] = time.perf_counter() - t
    res["rss_after_merge_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter(); remove_layers(m, plan["keep"]); save_model(m, tok, out); res["save_s"] = time.perf_counter() - t
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res))
"""


def child(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scores", required=True, help="folder with scores.json and igia.safetensors")
    ap.add_argument("--prune", type=int, default=12)
    ap.add_argument("--merge", type=int, default=3)
    a = ap.parse_args()
    from gradpruner import api
    from gradpruner.models.loading import resolve_model

    src = resolve_model(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        plan = api.plan(Path(a.scores) / "scores.json", Path(tmp) / "plan.json", prune=a.prune, merge=a.merge)
        plan["igia"] = str(Path(a.scores) / "igia.safetensors")
        (Path(tmp) / "plan.json").write_text(json.dumps(plan))
        base = child("imports", a.model, "-", "-")
        full = child("full", a.model, Path(tmp) / "plan.json", Path(tmp) / "out")
    cfg = json.loads((src / "config.json").read_text())
    f_w_mb = cfg["hidden_size"] * cfg["intermediate_size"] * 4 / 2**20
    extra = full["peak_rss_mb"] - base["peak_rss_mb"]
    io = full["load_s"] + full["save_s"]
    print(f"model {a.model}: {full['weight_mb']:.0f} MiB of weights before pruning; plan: {a.prune} removed, {a.merge} merged "
          f"({len(plan['merge']) * 7} modules merged)")
    print(f"time: load {full['load_s']:.1f} s, merge {full['merge_s']:.1f} s, remove+save {full['save_s']:.1f} s "
          f"(I/O share {io / (io + full['merge_s']):.0%})")
    print(f"peak RSS {full['peak_rss_mb']:.0f} MiB; imports alone {base['peak_rss_mb']:.0f} MiB; "
          f"after load {full['rss_after_load_mb']:.0f}, after merge {full['rss_after_merge_mb']:.0f} MiB")
    print(f"peak above imports: {extra:.0f} MiB = {extra / full['weight_mb']:.2f}x the weights; "
          f"budget (weights + one largest F_W of {f_w_mb:.1f} MiB) = {full['weight_mb'] + f_w_mb:.0f} MiB")


if __name__ == "__main__":
    main()
