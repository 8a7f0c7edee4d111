"""What a finished ``gradpruner search`` says: the curve as CSV, a plot, a short page and the answer's plan."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from gradpruner.report.plots import plot_search_curve
from gradpruner.util.atomic import atomic_file, write_json
from gradpruner.util.tables import markdown_table

COLUMNS = ("phase", "k", "budget", "params", "value", "drop", "drop_low", "drop_high", "loss", "loss_ratio",
           "within", "seconds")
BUDGET_LABELS = {"layers": "decoder layers removed", "params": "fraction of parameters removed",
                 "latency": "latency ratio to the dense model"}


def curve_rows(result: dict) -> list[dict]:
    """One row per measured point, the dense references first (before fine-tuning, then fine-tuned)."""
    rows = []
    for phase, ref, points in (("before_finetune", result["dense"], result["before_finetune"]),
                               ("finetuned", result["dense_ft"], result["finetuned"])):
        for p in [ref, *points]:
            lo, hi = p.get("drop_interval") or (None, None)
            rows.append({"phase": phase, "k": p.get("k", 0), "budget": p["budget"], "params": p["params"],
                         "value": p["value"], "drop": p.get("drop", 0.0), "drop_low": lo, "drop_high": hi,
                         "loss": p["loss"], "loss_ratio": p.get("loss_ratio", 1.0), "within": p.get("within", True),
                         "seconds": p.get("seconds")})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def write_search_outputs(out: Path, result: dict, plan: dict | None) -> None:
    """search.json, curve.csv, search.png, search.md and, with an answer, plan.json, each written atomically
    (an earlier plan.json is removed when this search has no answer, so none is left that it did not give)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = curve_rows(result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
    with atomic_file(out / "curve.csv") as fh:
        fh.write(buf.getvalue())
    s = result["search"]
    plot_search_curve(rows, out / "search.png", BUDGET_LABELS[s["budget"]], s["max_drop"], s["max_loss"],
                      result["recommended"])
    write_json(out / "search.json", result)
    if plan is not None:
        write_json(out / "plan.json", plan)
    else:
        (out / "plan.json").unlink(missing_ok=True)
    with atomic_file(out / "search.md") as fh:
        fh.write(search_page(result, rows))


def search_page(result: dict, rows: list[dict]) -> str:
    s, sl = result["search"], result["slice"]
    tol = f"--max-drop {s['max_drop']}" if s["max_drop"] is not None else f"--max-loss {s['max_loss']}"
    budget = [] if s["budget"] == "layers" else [BUDGET_LABELS[s["budget"]]]
    table = markdown_table(["phase", "layers removed", *budget, result["dense"]["metric"], "drop [95% interval]",
                            "loss ratio", "within", "seconds"],
                           [[r["phase"].replace("_", " "), str(r["k"]), *([_fmt(r["budget"])] if budget else []),
                             f"{r['value']:.3f}", f"{r['drop']:+.3f}" + (f" [{r['drop_low']:+.3f}, {r['drop_high']:+.3f}]"
                                                                      if r["drop_low"] is not None else ""),
                             f"{r['loss_ratio']:.3f}", "yes" if r["within"] else "no",
                             "" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows])
    return (f"# How much can go: {result['model']} on {result['task'] or result['data']}\n\n"
            f"**{result['verdict']}**\n\n"
            f"Tolerance {tol}; validation items {sl['offset']}..{sl['offset'] + sl['limit'] - 1} of {sl['n_heldout']} "
            f"held-out items (test on the items before them); scoring method {result['score_method']}; every "
            f"fine-tune {result['finetune'].get('max_steps') or result['finetune'].get('epochs')} "
            f"{'steps' if result['finetune'].get('max_steps') else 'epochs'}. Before fine-tuning each point is "
            "compared with the dense model, after fine-tuning with the dense model fine-tuned alike; "
            "drop intervals are paired bootstrap 95% intervals over the same items.\n\n"
            f"![curve](search.png)\n\n{table}\n")
