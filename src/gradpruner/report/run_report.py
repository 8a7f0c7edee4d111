"""The run report: one list of blocks rendered to Markdown and to a self-contained HTML page."""
from __future__ import annotations

import json
from pathlib import Path

from gradpruner.planning.plans import plan_summary
from gradpruner.report.pages import write_page
from gradpruner.report.plots import plot_bars, plot_layer_scores
from gradpruner.scoring.variants import guard_pool

ROWS = [("dense_zero_shot", "dense, zero-shot"), ("dense_ft", "dense, fine-tuned"),
        ("pruned", "pruned, no fine-tune"), ("pruned_ft", "GradPruner (pruned + fine-tuned)")]
GRADPRUNER_PATH = ("score", "plan", "prune", "pruned_ft")
STAGE_ORDER = ("dense_ft", "score", "plan", "prune", "heal", "pruned_ft", "eval_dense_zero_shot", "eval_dense_ft",
               "eval_pruned", "eval_pruned_ft")


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _label(name: str, label: str, result: dict) -> str:
    """A row's label; the pruned model's says so when the run evaluated it healed (its folder is ``healed``)."""
    if name == "pruned" and Path(str(result.get("model", ""))).name == "healed":
        return "pruned + healed, no fine-tune"
    return label


def _results_table(evals: dict) -> list[list[str]]:
    base = evals.get("dense_ft") or evals.get("dense_zero_shot")
    head = ["model", "metric", "value", "n", "parameters", "× dense", "GFLOPs/token", "× dense",
            "prefill s (1×128)", "decode tok/s"]
    rows = [head]
    for name, label in ROWS:
        e = evals.get(name)
        if not e:
            continue
        p, f = e["params"]["total"], e["flops_per_token"]["flops"]
        rows.append([_label(name, label, e), e["metric"], _fmt(e["value"]), str(e["n"]), _fmt(p),
                     _fmt(p / base["params"]["total"]) if base else "–", _fmt(f / 1e9),
                     _fmt(f / base["flops_per_token"]["flops"]) if base else "–",
                     _fmt(e["latency"]["prefill_s"]), _fmt(e["latency"]["decode_tokens_per_s"], 1)])
    return rows


def _cost_table(stages: dict) -> tuple[list[list[str]], str]:
    rows = [["stage", "seconds", "peak RSS MiB"]]
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    for name, rec in sorted(stages.items(), key=lambda kv: order.get(kv[0], len(order))):
        u = rec.get("usage", {})
        rows.append([name, _fmt(u.get("seconds"), 1), _fmt(u.get("peak_rss_mb"), 0)])
    gp = sum(stages[s]["usage"]["seconds"] for s in GRADPRUNER_PATH + ("heal",) if s in stages)
    note = ""
    if "dense_ft" in stages and all(s in stages for s in GRADPRUNER_PATH):
        dense = stages["dense_ft"]["usage"]["seconds"]
        ft = stages["pruned_ft"]["usage"]["seconds"] / dense
        heal = " + heal" if "heal" in stages else ""
        note = (f"GradPruner path (score + plan + prune{heal} + fine-tune pruned): {gp:.0f} s; dense path "
                f"(fine-tune dense): {dense:.0f} s; ratio {gp / dense:.2f} (fine-tuning alone: pruned/dense "
                f"{ft:.2f}). The early scoring steps are counted in the "
                "GradPruner path. Times from this run only (stages that were skipped keep the time of the run that made them).")
    return rows, note


def build_blocks(run_dir: Path) -> list[tuple]:
    cfg_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    scores, plan = _load(run_dir / "scores" / "scores.json"), _load(run_dir / "plan.json")
    evals = {n: _load(run_dir / "eval" / f"{n}.json") for n, _ in ROWS}
    evals = {k: v for k, v in evals.items() if v}
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*.json"))
              if not p.name.endswith(".started.json")}
    blocks: list[tuple] = [("h1", f"gradpruner run: {run_dir.name}")]
    if evals:
        first = next(iter(evals.values()))
        blocks += [("p", f"Task: {first.get('task') or 'custom data'}; held-out split: {first.get('split', 'eval')}, "
                         f"n = {first['n']}; primary metric: {first['metric']}."),
                   ("table", _results_table(evals))]
        if first.get("encoder"):
            blocks.append(("p", (f"BERTScore encoder: {first['encoder']} (BERTScore's usual encoder is roberta-large, "
                                 "so these BERTScores are not comparable with published ones).")))
        plot_bars({_label(n, label, evals[n]): evals[n]["value"] for n, label in ROWS if n in evals}, run_dir / "accuracy.png",
                  ylabel=first["metric"], title="held-out score")
        blocks.append(("img", run_dir / "accuracy.png", "held-out score per model"))
    if scores and plan:
        method = scores.get("method", "igia")
        title = "IGIA layer scores" if method == "igia" else f"{method} layer scores"
        plot_layer_scores(scores["layer_scores"], run_dir / "layer_scores.png", set(plan["drop"]), plan["merge"], title=title)
        if "informative_steps" in scores:
            how = (f"{scores['steps']} {'DoRA' if scores.get('adapter') == 'dora' else 'LoRA'} steps scored "
                   f"({scores['informative_steps']} informative: step 1 has no signal because the adapter's B starts at zero).")
        else:
            how = f"Method {method}" + (f", {scores['steps']} training steps." if scores.get("steps") else ", no training steps.")
        stats = scores.get("variant_statistics") or {}
        order = stats.get("block_order") or scores.get("block_order")
        if order:  # a greedy block search: pairs of attention (even id) and MLP (odd id) blocks
            named = ", ".join("+".join(f"{'attn' if b % 2 == 0 else 'mlp'} {b // 2}" for b in unit) for unit in order)
            passes = stats.get("forward_passes", scores.get("forward_passes"))
            how += (f" Greedy removal of attention/MLP block pairs by measured calibration loss, in order: {named} "
                    f"({passes} calibration passes); the layer scores plotted are the mean step at which a layer's "
                    "two blocks went.")
        elif "greedy_order" in stats:  # igia_greedy: IGIA's pool, the measured loss chose
            how += (f" Greedy removal by measured calibration loss among the {len(stats['greedy_candidates'])} layers "
                    f"IGIA ranks lowest (order {stats['greedy_order']}, {stats['forward_passes']} calibration passes); "
                    "the others (scored above every candidate) were never candidates.")
        elif "target" in stats:  # a guarded variant: say which layers were never candidates
            guard = "block influence" if "block_influence" in stats else "removal loss"
            how += (f" IGIA chose among the {guard_pool(stats['target'], len(scores['layer_scores']))} layers that "
                    f"{guard} ranks lowest; the others (scored above every candidate) were never candidates.")
        blocks += [("h2", "Layer scores and plan"), ("p", f"Scoring method: {method}. {how}"),
                   ("img", run_dir / "layer_scores.png", title), ("pre", plan_summary(plan))]
        blocks += _sensitivity_blocks(scores, len(plan["drop"]), run_dir)
    if stages:
        rows, note = _cost_table(stages)
        blocks += [("h2", "Cost of every stage"), ("table", rows)] + ([("p", note)] if note else [])
    blocks += [("h2", "Config"), ("pre", cfg_text)]
    return blocks


def _sensitivity_blocks(scores: dict, k: int, run_dir: Path) -> list:
    """Paper Fig. 2 for this run: do the k layers removed after s scoring steps match those after T?"""
    from gradpruner.scoring.sensitivity import (
        agreement_curve,
        first_stable_step,
        plot_curve,
    )

    steps = scores.get("step_layer_sq_norms") or []
    if len(steps) < 2 or not 1 <= k < len(steps[0]):
        return []
    curve = agreement_curve(steps, k)
    plot_curve(curve, run_dir / "sensitivity.png")
    stable = first_stable_step(curve)
    return [("h2", "How soon the ranking settles"),
            ("p", f"Share of the {k} layers chosen for removal after s scoring steps that are also chosen after all "
                  f"{len(steps)} steps (and the rank correlation of all layer scores). "
                  + (f"The removed set is final from step {stable} on." if stable else "The removed set never settles.")),
            ("img", run_dir / "sensitivity.png", "removed-set agreement vs scoring steps")]


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and a self-contained report.html into the run folder."""
    run_dir = Path(run_dir)
    blocks = build_blocks(run_dir)
    write_page(blocks, run_dir, "report", "gradpruner report")
    return run_dir / "report.md"
