"""The demo: the whole pipeline on SmolLM2-135M and ARC-Easy, small enough for a laptop CPU.

It is ``gradpruner run configs/demo.yaml`` (the same settings, built here so the demo runs from any
folder) followed by a short table of what was won and lost.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from gradpruner.pipeline.config import (
    EvalStageConfig,
    FinetuneStageConfig,
    PlanConfig,
    RunConfig,
    ScoreConfig,
    config_from_dict,
)
from gradpruner.pipeline.run import run


def demo_config(out: str = "runs/demo", overrides: list[str] = ()) -> RunConfig:
    """The settings of configs/demo.yaml (a test keeps the two equal)."""
    cfg = RunConfig(
        model="smollm2-135m", task="arc_easy", out=out, seed=0,
        score=ScoreConfig(steps=20),  # the default method; 20 early steps keep the demo short
        plan=PlanConfig(),  # the default: 12 of 30 layers removed, none merged
        finetune=FinetuneStageConfig(max_steps=100, lr=2e-4),
        eval=EvalStageConfig(limit=200),
    )
    return config_from_dict(cfg.to_dict(), overrides) if overrides else cfg


def summary_table(run_dir: Path) -> str:
    rows = [("dense, zero-shot", "dense_zero_shot"), ("dense, fine-tuned", "dense_ft"),
            ("pruned, no fine-tune", "pruned"), ("GradPruner: pruned + fine-tuned", "pruned_ft")]
    evals = {k: json.loads(p.read_text()) for _, k in rows if (p := run_dir / "eval" / f"{k}.json").is_file()}
    if not evals:
        return "(no evaluations found)"
    base = evals.get("dense_ft") or next(iter(evals.values()))
    metric = base["metric"]
    lines = [f"{'':34}{metric:>8}{'params':>14}{'× dense':>9}{'prefill s':>11}{'decode tok/s':>14}"]
    for label, k in rows:
        if k in evals:
            e = evals[k]
            p = e["params"]["total"]
            lines.append(f"{label:34}{e['value']:>8.3f}{p:>14,}{p / base['params']['total']:>9.3f}"
                         f"{e['latency']['prefill_s']:>11.3f}{e['latency']['decode_tokens_per_s']:>14.1f}")
    return "\n".join(lines)


def run_demo(args) -> Path:
    t0 = time.time()
    cfg = demo_config(args.out, getattr(args, "overrides", []) or [])
    print("gradpruner demo: SmolLM2-135M (a 135M-parameter model) on ARC-Easy; a short LoRA fine-tune of "
          f"{cfg.finetune.max_steps} steps for both the dense and the pruned model, evaluated on the first "
          f"{cfg.eval.limit} validation questions. Small model, short run: a smoke test of the method, not the paper's setting.")
    report = run(cfg)
    n = json.loads((Path(cfg.out) / "eval" / "pruned_ft.json").read_text())["n"]
    print()
    print(summary_table(Path(cfg.out)))
    print(f"\n(n = {n} questions; latency: one 128-token prompt, batch 1, this machine; {time.time() - t0:.0f} s in all)")
    print(f"full report: {report}")
    return report
