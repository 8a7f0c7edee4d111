"""Multiple-choice evaluation speed: gradpruner's scorer vs lm-evaluation-harness's HFLM.

The same ARC-Easy validation questions, the same model object and the same (context, continuation)
pairs go to both. They alternate chunk by chunk (ours first in even chunks, lm-eval first in odd
ones) so that machine drift — other users of a shared CPU — falls on both alike. Each side gets the
same number of sequences per forward pass: ours ``--batch`` questions, HFLM ``--batch`` × 4 requests.
Run:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python bench/bench_eval.py --model smollm2-135m --questions 60
"""
from __future__ import annotations

import argparse
import time

import torch

from gradpruner.data.examples import load_task_rows
from gradpruner.data.tasks import TASKS
from gradpruner.evaluation.evaluate import _eval_converter
from gradpruner.evaluation.loglik import score_choices
from gradpruner.evaluation.metrics import acc, acc_norm
from gradpruner.models.loading import load_model, load_tokenizer, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--chunk", type=int, default=10, help="questions per alternation")
    ap.add_argument("--batch", type=int, default=8, help="questions per forward pass (HFLM: x4 requests)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="auto", help="our scoring method: auto, packed or cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    source = resolve_model(args.model)
    model, tok = load_model(source), load_tokenizer(source)
    items = [r.item for r in load_task_rows(args.task, "eval", _eval_converter(TASKS[args.task]))][:args.questions]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch * 4)

    def ours(chunk):
        return score_choices(model, tok, chunk, batch_size=args.batch, progress=False, method=args.method)

    def theirs(chunk):
        reqs = [Instance("loglikelihood", {}, (c, k), j) for it in chunk
                for j, (c, k) in enumerate(zip(it.contexts, it.continuations))]
        flat = iter(ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True))
        return [[next(flat) for _ in it.contexts] for it in chunk]

    ours(items[:2]), theirs(items[:2])  # warm-up (allocator, first-call overheads)
    seconds = {"ours": 0.0, "lm-eval": 0.0}
    results = {"ours": [], "lm-eval": []}
    for n, start in enumerate(range(0, len(items), args.chunk)):
        chunk = items[start:start + args.chunk]
        sides = [("ours", ours), ("lm-eval", theirs)]
        for name, fn in (sides if n % 2 == 0 else sides[::-1]):
            t0 = time.perf_counter()
            results[name] += fn(chunk)
            seconds[name] += time.perf_counter() - t0

    diff = max(abs(a - b) for o, t in zip(results["ours"], results["lm-eval"]) for a, b in zip(o, t))
    n = len(items)
    per_q = {k: v / n for k, v in seconds.items()}
    print(f"model {args.model}, task {args.task}: {n} questions ({sum(len(i.contexts) for i in items)} choices), "
          f"torch threads {args.threads}, alternating chunks of {args.chunk}, our method {args.method}, "
          f"{args.batch} questions / {args.batch * 4} HFLM requests per batch")
    print(f"seconds/question: ours {per_q['ours']:.3f}, lm-eval HFLM {per_q['lm-eval']:.3f}; "
          f"lm-eval / ours = {per_q['lm-eval'] / per_q['ours']:.2f}x")
    print(f"max |Δ loglik| = {diff:.2e}")
    for name in ("ours", "lm-eval"):
        a = sum(acc(r, it) for r, it in zip(results[name], items)) / n
        an = sum(acc_norm(r, it) for r, it in zip(results[name], items)) / n
        print(f"{name:8} acc {a:.3f}  acc_norm {an:.3f}")


if __name__ == "__main__":
    main()
