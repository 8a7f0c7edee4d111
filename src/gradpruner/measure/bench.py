"""Dense vs pruned, side by side: what pruning buys in parameters, FLOPs, time and memory.

Every measured number is the median of ``reps`` runs taken in alternation (dense, pruned, dense,
pruned, ...) after untimed warm-up runs of each, so slow drift of the machine (heat, other load)
falls on both models alike; each ratio is pruned / dense of the two medians. Beside each measured
ratio stands the one predicted if it followed the work exactly: for times the analytic FLOPs ratio
(``costs.analytic_costs``; for throughputs its inverse), for memory the parameter ratio.

Memory is each model's own: a fresh child process per model loads it alone and runs the same
shapes. On CPU a phase's peak is the kernel's resident-set high-water mark (VmHWM, reset before
the phase through /proc/self/clear_refs) minus the resident set before the model was loaded, so
the Python/torch runtime and the transient of loading are left out; on GPU it is
``torch.cuda.max_memory_allocated`` (weights, activations, cache, optimizer state).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.measure.costs import (
    analytic_costs,
    infer_once,
    peak_mb,
    random_ids,
    reset_peak,
    rss_mb,
    sync,
)
from gradpruner.models.architectures import linear_module_names
from gradpruner.models.lora import attach_lora
from gradpruner.models.runtime import resolve, runtime_config
from gradpruner.util.atomic import atomic_dir, check_output, write_json
from gradpruner.util.tables import markdown_table

PARTS = ("inference", "memory", "train")
TRAIN_MODES = ("lora", "full")
# The LoRA step is timed with the adapters `gradpruner finetune` trains by default (its rank is --rank);
# tests/test_bench.py checks these against finetuning.config.FinetuneConfig.
LORA_ALPHA, LORA_DROPOUT = 32, 0.05


def _problems(o: dict) -> list[str]:
    out = []
    for key, flag in (("seqs", "--seq"), ("batches", "--batch")):
        if not o[key] or any(not isinstance(v, int) or v < 1 for v in o[key]):
            out.append(f"{flag} needs one or more positive integers, not {list(o[key])}.")
    for key, flag, low in (("reps", "--reps", 1), ("warmup", "--warmup", 0), ("new_tokens", "--new-tokens", 1),
                           ("train_batch", "--train-batch", 1), ("train_seq", "--train-seq", 2), ("rank", "--rank", 1)):
        if not isinstance(o[key], int) or o[key] < low:
            out.append(f"{flag} must be an integer ≥ {low}, not {o[key]!r}.")
    unknown = set(o["parts"]) - set(PARTS)
    if unknown:
        out.append(f"Unknown bench parts {sorted(unknown)}; choose among {', '.join(PARTS)}.")
    return out


@contextlib.contextmanager
def _trainable(model, mode: str, rank: int):
    """The model to train and its trainable parameters: LoRA adapters as ``gradpruner finetune``
    adds them (removed again afterwards), or every weight."""
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        yield model, list(model.parameters())
        return
    net = attach_lora(model, rank=rank, alpha=LORA_ALPHA, dropout=LORA_DROPOUT,
                      target_modules=linear_module_names(model))
    try:
        yield net, [p for p in net.parameters() if p.requires_grad]
    finally:
        net.unload()


def train_session(model, mode: str, ids: torch.Tensor, warmup: int = 1, rank: int = 8) -> float:
    """Seconds of one AdamW step (forward, loss, backward, update) after ``warmup`` ≥ 1 untimed
    steps (the first allocates the optimizer state), labels = inputs."""
    device = str(ids.device)
    with _trainable(model, mode, rank) as (net, params):
        opt = torch.optim.AdamW(params, lr=1e-5)
        net.train()
        try:
            for _ in range(max(warmup, 1) + 1):
                sync(device)
                t0 = time.perf_counter()
                net(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                seconds = time.perf_counter() - t0
        finally:
            net.eval()
            del opt
    return seconds


def alternate(fns: dict, reps: int, warmup: int = 0) -> dict[str, list]:
    """Run each of ``fns`` ``warmup`` times untimed, then ``reps`` rounds of all in turn: a, b, a, b, …"""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(fn())
    return runs


def _row(group, metric, unit, shape, dense_runs, pruned_runs, predicted=None, basis=None) -> dict:
    d, p = statistics.median(dense_runs), statistics.median(pruned_runs)
    return {"group": group, "metric": metric, "unit": unit, "shape": shape, "dense": d, "pruned": p,
            "ratio": p / d, "predicted": predicted, "basis": basis,
            "dense_runs": list(dense_runs), "pruned_runs": list(pruned_runs)}


def _analytic_rows(costs: dict, seqs) -> list[dict]:
    d, p = costs["dense"][seqs[0]]["params"], costs["pruned"][seqs[0]]["params"]
    rows = [_row("size", f"parameters, {k.replace('_', ' ')}", "", "", [d[k]], [p[k]])
            for k in ("total", "decoder_layers", "embedding")]
    for s in seqs:
        cd, cp = costs["dense"][s], costs["pruned"][s]
        rows += [_row("compute", f"{label} per token (forward)", "", f"s{s}", [cd[k]], [cp[k]])
                 for k, label in (("macs_per_token", "MACs"), ("flops_per_token", "FLOPs"))]
    return rows


def _prefill_macs(c: dict) -> float:
    """MACs of prefilling one sequence of S tokens with logits for the last one only."""
    return c["seq_len"] * (c["decoder_linear_macs"] + c["attention_macs"]) + c["head_macs"]


def _inference_rows(models: dict, configs: dict, o: dict) -> list[dict]:
    rows, vocab, n = [], min(c.vocab_size for c in configs.values()), o["new_tokens"]
    for b in o["batches"]:
        for s in o["seqs"]:
            ids = random_ids(vocab, b, s, o["device"])
            runs = alternate({k: (lambda m=m: infer_once(m, ids, n)) for k, m in models.items()}, o["reps"], o["warmup"])
            pre = {k: [r[0] for r in v] for k, v in runs.items()}
            dec = {k: [b * n / r[1] for r in v] for k, v in runs.items()}
            f_pre = _prefill_macs(analytic_costs(configs["pruned"], s)) / _prefill_macs(analytic_costs(configs["dense"], s))
            ctx = s + (n + 1) // 2  # mean context of the decoded tokens
            f_dec = analytic_costs(configs["pruned"], ctx)["macs_per_token"] / analytic_costs(configs["dense"], ctx)["macs_per_token"]
            shape = f"b{b} s{s}"
            rows += [_row("inference", "prefill latency", "s", shape, pre["dense"], pre["pruned"], f_pre, "flops"),
                     _row("inference", "prefill throughput", "tok/s", shape, [b * s / t for t in pre["dense"]],
                          [b * s / t for t in pre["pruned"]], 1 / f_pre, "flops"),
                     _row("inference", f"decode throughput (+{n} tok, KV cache)", "tok/s", shape,
                          dec["dense"], dec["pruned"], 1 / f_dec, "flops")]
    return rows


def _train_rows(models: dict, configs: dict, o: dict) -> list[dict]:
    b, s = o["train_batch"], o["train_seq"]
    ids = random_ids(min(c.vocab_size for c in configs.values()), b, s, o["device"])
    cd, cp = analytic_costs(configs["dense"], s), analytic_costs(configs["pruned"], s)
    f = cp["macs_per_token"] / cd["macs_per_token"]  # fwd + bwd ≈ 3 (full) or 2 (LoRA) × fwd: same ratio
    rows = []
    for mode in TRAIN_MODES:
        fns = {k: (lambda m=m: train_session(m, mode, ids, o["warmup"], o["rank"])) for k, m in models.items()}
        runs = alternate(fns, o["reps"])
        rows.append(_row("train", f"{mode} step time", "s", f"b{b} s{s}", runs["dense"], runs["pruned"], f, "flops"))
    return rows


# --- memory: one child process per model ------------------------------------------------------

def child_memory(args: dict) -> dict:
    """In a fresh process: load one model and return the peak MiB of each inference shape and
    of a LoRA and a full fine-tuning step (run in that order, the peak reset before each)."""
    from transformers import AutoModelForCausalLM

    from gradpruner.models.loading import load_config, load_model

    torch.set_num_threads(args["threads"])
    with torch.device("meta"):  # import the modelling code first, so the baseline holds it
        AutoModelForCausalLM.from_config(load_config(args["model"], args["runtime"]["trust_remote_code"]),
                                         trust_remote_code=args["runtime"]["trust_remote_code"])
    device, base = args["device"], rss_mb()
    model = load_model(args["model"], resolve(args["runtime"]))
    vocab, res = model.config.vocab_size, {"inference": {}, "train": {}}
    for b, s in args["shapes"]:
        res["method"] = reset_peak(device)
        infer_once(model, random_ids(vocab, b, s, device), args["new_tokens"])
        res["inference"][f"b{b} s{s}"] = peak_mb(device, base)
    if args["train"]:
        ids = random_ids(vocab, args["train_batch"], args["train_seq"], device)
        for mode in TRAIN_MODES:
            reset_peak(device)
            train_session(model, mode, ids, 1, args["rank"])
            res["train"][mode] = peak_mb(device, base)
    return res


def _run_child(src, name: str, o: dict) -> dict:
    args = {"model": str(src), "device": o["device"], "dtype": o["dtype"], "threads": torch.get_num_threads(),
            "shapes": [[b, s] for b in o["batches"] for s in o["seqs"]], "new_tokens": o["new_tokens"],
            "train": "train" in o["parts"], "train_batch": o["train_batch"], "train_seq": o["train_seq"],
            "rank": o["rank"], "runtime": o["runtime"]}
    proc = subprocess.run([sys.executable, "-m", "gradpruner.measure.bench", json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise GradPrunerError(f"Measuring the memory of the {name} model {src} failed in a child process ({last}); "
                              "fix the cause or pass --skip-memory.")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_rows(sources: dict, params_ratio: float, o: dict) -> tuple[list[dict], str]:
    mem = {name: _run_child(src, name, o) for name, src in sources.items()}  # dense, then pruned
    d, p = mem["dense"], mem["pruned"]
    rows = [_row("memory", "inference peak", "MiB", shape, [d["inference"][shape]], [p["inference"][shape]],
                 params_ratio, "params") for shape in d["inference"]]
    rows += [_row("memory", f"{mode} step peak", "MiB", f"b{o['train_batch']} s{o['train_seq']}",
                  [d["train"][mode]], [p["train"][mode]], params_ratio, "params") for mode in d["train"]]
    method = d.get("method", "")
    return rows, method if o["device"].startswith("cuda") else f"{method} minus the RSS before loading"


# --- the whole bench ------------------------------------------------------------------------

def _resolve(dense, pruned) -> dict:
    from gradpruner.models.loading import resolve_model

    sources = {}
    for name, flag, spec in (("dense", "--model", dense), ("pruned", "--pruned", pruned)):
        try:
            sources[name] = resolve_model(spec)
        except GradPrunerError as exc:
            raise GradPrunerError(f"{flag}: {exc}") from None
    return sources


def _check_lengths(configs: dict, o: dict) -> None:
    longest = max(max(o["seqs"]) + o["new_tokens"], o["train_seq"])
    for name, cfg in configs.items():
        limit = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        if limit and longest > limit:
            raise GradPrunerError(f"Sequences of {longest} tokens exceed the {name} model's max_position_embeddings "
                                  f"{limit}; choose a shorter --seq, --new-tokens or --train-seq.")


def _environment(o: dict) -> dict:
    import transformers

    if o["device"].startswith("cuda"):
        hardware = torch.cuda.get_device_name(o["device"])
    else:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
        hardware = f"{names[0] if names else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"hardware": hardware, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench_models(dense, pruned, *, seqs=(128, 512), batches=(1, 4), reps: int = 3, warmup: int = 1,
                 new_tokens: int = 16, train_batch: int = 4, train_seq: int = 128, rank: int = 8,
                 parts=PARTS, runtime=None, out=None, overwrite: bool = False) -> dict:
    """Measure ``dense`` and ``pruned`` side by side (see the module doc); with ``out``, write
    bench.json and bench.md there (atomically). Returns the result: settings, analytic costs, rows.
    Both models run on ``runtime``'s device in its dtype (a ``RuntimeConfig``, a ``Runtime`` or None: auto)."""
    from gradpruner.models.loading import load_config, load_model

    o = {"seqs": list(seqs), "batches": list(batches), "reps": reps, "warmup": warmup, "new_tokens": new_tokens,
         "train_batch": train_batch, "train_seq": train_seq, "rank": rank, "parts": list(parts)}
    if problems := _problems(o):
        raise GradPrunerError(*problems)
    rt = resolve(runtime)
    o["device"], o["dtype"] = str(rt.device), rt.dtype_name
    o["runtime"] = dataclasses.asdict(runtime_config(rt))  # for the memory child processes
    sources = _resolve(dense, pruned)
    if out is not None:
        check_output(out, overwrite, inputs=tuple(sources.values()))
    configs = {k: load_config(src, rt.trust_remote_code) for k, src in sources.items()}
    _check_lengths(configs, o)
    seq_set = sorted(set(o["seqs"]) | {o["train_seq"]})
    costs = {k: {s: analytic_costs(c, s) for s in seq_set} for k, c in configs.items()}
    rows = _analytic_rows(costs, o["seqs"])
    if {"inference", "train"} & set(o["parts"]):
        models = {k: load_model(src, rt) for k, src in sources.items()}
        if "inference" in o["parts"]:
            rows += _inference_rows(models, configs, o)
        if "train" in o["parts"]:
            rows += _train_rows(models, configs, o)
        del models
        gc.collect()
    method = None
    if "memory" in o["parts"]:
        mem_rows, method = _memory_rows(sources, rows[0]["ratio"], o)
        rows += mem_rows
    result = {"dense": str(sources["dense"]), "pruned": str(sources["pruned"]),
              "settings": {k: v for k, v in o.items() if k != "runtime"}, "runtime": rt.record(),
              "environment": _environment(o), "memory_method": method,
              "analytic": {k: {str(s): c for s, c in v.items()} for k, v in costs.items()}, "rows": rows}
    if out is not None:
        write_bench(result, out, overwrite)
    return result


# --- output ---------------------------------------------------------------------------------

def _fmt(v: float, unit: str) -> str:
    if unit == "":
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.2f}{suffix}"
        return f"{v:.0f}"
    return f"{v:.4f}" if unit == "s" else f"{v:.1f}"


def format_table(result: dict) -> str:
    """The rows as a Markdown table: dense, pruned, pruned/dense and the predicted ratio."""
    rows = []
    for r in result["rows"]:
        unit = f" ({r['unit']})" if r["unit"] else ""
        pred = "" if r["predicted"] is None else f"{r['predicted']:.3f} ({'FLOPs' if r['basis'] == 'flops' else 'params'})"
        rows.append([r["group"], f"{r['metric']}{unit}", r["shape"], _fmt(r["dense"], r["unit"]),
                     _fmt(r["pruned"], r["unit"]), f"{r['ratio']:.3f}", pred])
    return markdown_table(["group", "metric", "shape", "dense", "pruned", "pruned/dense", "predicted"], rows,
                          align="---rrrr")


def format_report(result: dict) -> str:
    """bench.md: what was compared, where, with which settings, and the table."""
    s, env = result["settings"], result["environment"]
    return "\n".join([
        "# Dense vs pruned", "",
        f"- dense: `{result['dense']}`", f"- pruned: `{result['pruned']}`",
        f"- hardware: {env['hardware']}; device {s['device']}, {s['dtype']}; torch {env['torch']}, "
        f"transformers {env['transformers']}; {env['date']}",
        f"- medians of {s['reps']} alternating runs after {s['warmup']} warm-up run(s); s = prompt tokens, "
        f"b = batch; decode adds {s['new_tokens']} tokens; training: AdamW, LoRA rank {s['rank']} or full",
        f"- memory: {result['memory_method'] or 'not measured'}",
        "- predicted: the ratio if time followed the analytic FLOPs exactly (throughput: its inverse), "
        "or memory the parameter count; see docs/bench.md", "",
        format_table(result), ""])


def write_bench(result: dict, out, overwrite: bool = False) -> Path:
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / "bench.json", result)
        (tmp / "bench.md").write_text(format_report(result), encoding="utf-8")
    return Path(out)


if __name__ == "__main__":  # the memory child: python -m gradpruner.measure.bench '{json args}'
    print(json.dumps(child_memory(json.loads(sys.argv[1]))))
