"""Readable output: text summaries for the terminal and plots for the report."""
from __future__ import annotations

import math
from pathlib import Path


def score_bars(layer_scores: list[float], dropped: set[int] | frozenset = frozenset(), merged: dict | None = None,
               width: int = 40) -> str:
    """One line per layer: index, score, a log-scale bar, and its fate in the plan."""
    merged = merged or {}
    positive = [s for s in layer_scores if s > 0]
    lo = math.log10(min(positive)) if positive else 0.0
    hi = math.log10(max(positive)) if positive else 1.0
    span = max(hi - lo, 1e-12)
    lines = []
    for j, s in enumerate(layer_scores):
        n = 0 if s <= 0 else 1 + int((width - 1) * (math.log10(s) - lo) / span)
        fate = f"merged -> {merged[str(j)]}" if str(j) in merged else ("dropped" if j in dropped else "")
        lines.append(f"  layer {j:>3}  {s:10.3e}  {'#' * n:<{width}}  {fate}")
    return "\n".join(lines)


def plot_layer_scores(layer_scores: list[float], path: Path, dropped=frozenset(), merged: dict | None = None,
                      title: str = "IGIA layer scores") -> Path:
    """Bar chart of layer scores (log scale), dropped layers grey and merged ones orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = merged or {}
    colors = ["tab:orange" if str(j) in merged else ("lightgrey" if j in dropped else "tab:blue")
              for j in range(len(layer_scores))]
    fig, ax = plt.subplots(figsize=(max(6, len(layer_scores) * 0.3), 3.5))
    ax.bar(range(len(layer_scores)), [max(s, 1e-30) for s in layer_scores], color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("score")
    ax.set_title(title)
    if dropped:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:blue", label="kept"), Patch(color="tab:orange", label="merged"),
                           Patch(color="lightgrey", label="dropped")], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bars(values: dict[str, float], path: Path, ylabel: str = "", title: str = "") -> Path:
    """One bar per labelled value (e.g. accuracy per model), the value written on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(values)), 3.5))
    bars = ax.bar(range(len(values)), list(values.values()), color="tab:blue")
    ax.set_xticks(range(len(values)), [k.replace(" (", "\n(") for k in values], fontsize=8)
    for bar, v in zip(bars, values.values()):
        ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grouped(rows: list[dict], axes: list[str], path: Path) -> Path:
    """Pruned + fine-tuned accuracy per cell: groups by task, one bar colour per other-axis label,
    with the dense fine-tuned model of each task as a dashed line."""
    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    others = [a for a in axes if a != "task"]
    name = {id(r): ", ".join(str(r[a]) for a in others) or "pruned+FT" for r in rows}
    labels = list(dict.fromkeys(name.values()))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * len(labels) * 0.5 + 2), 3.8))
    for i, label in enumerate(labels):
        ys = [next((r["pruned_ft"] for r in rows if r["task"] == t and name[id(r)] == label), 0.0) for t in tasks]
        ax.bar([x + i * width - 0.4 + width / 2 for x in range(len(tasks))], ys, width, label=str(label))
    for x, t in enumerate(tasks):
        dense = next((r["dense_ft"] for r in rows if r["task"] == t and r.get("dense_ft") is not None), None)
        if dense is not None:
            ax.hlines(dense, x - 0.45, x + 0.45, colors="black", linestyles="dashed",
                      label="dense, fine-tuned" if x == 0 else None)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy after fine-tuning")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy_lines(rows: list[dict], series_axis: str, path: Path) -> Path:
    """Accuracy after fine-tuning vs layers removed, one line per label of ``series_axis`` and task."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r[series_axis], r["task"]), []).append((r["removed"], r["pruned_ft"]))
    for (label, task), pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} ({task})")
    ax.set_xlabel("decoder layers removed")
    ax.set_ylabel("accuracy after fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_search_curve(rows: list[dict], path: Path, xlabel: str, max_drop: float | None, max_loss: float | None,
                      recommended: int | None) -> Path:
    """The search's curve: drop of the metric (with its interval) and loss ratio against the removal, before
    and after fine-tuning, the tolerance as a line and the recommended point circled."""
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    for phase, style in (("before_finetune", dict(color="0.6", marker="o", mfc="none")),
                         ("finetuned", dict(color="C0", marker="o"))):
        pts = sorted((r for r in rows if r["phase"] == phase), key=lambda r: r["budget"])
        xs = [r["budget"] for r in pts]
        err = [[r["drop"] - (r["drop_low"] if r["drop_low"] is not None else r["drop"]) for r in pts],
               [(r["drop_high"] if r["drop_high"] is not None else r["drop"]) - r["drop"] for r in pts]]
        label = {"before_finetune": "before fine-tuning", "finetuned": "fine-tuned"}[phase]
        top.errorbar(xs, [r["drop"] for r in pts], yerr=err, capsize=3, linestyle="-", label=label, **style)
        bottom.plot(xs, [r["loss_ratio"] for r in pts], linestyle="-", label=label, **style)
        for r in pts:
            if phase == "finetuned" and recommended is not None and r["k"] == recommended:
                top.plot([r["budget"]], [r["drop"]], marker="o", ms=14, mfc="none", mec="C3", mew=2,
                         label="recommended")
    if max_drop is not None:
        top.axhline(max_drop, color="C3", linestyle="--", label=f"tolerance {max_drop}")
    if max_loss is not None:
        bottom.axhline(max_loss, color="C3", linestyle="--", label=f"tolerance {max_loss}")
    top.axhline(0, color="0.8", linewidth=0.8)
    top.set_ylabel("drop vs dense (95% interval)")
    bottom.set_ylabel("held-out loss ratio")
    bottom.set_xlabel(xlabel)
    top.legend(fontsize=7)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pareto_points(rows: list[dict], series: list[str]) -> tuple[dict, tuple | None]:
    """{series label: [(params ratio, latency ratio, mean accuracy), ...] by params} and the dense point
    (1, 1, mean accuracy). A point is a series label at one removal, its accuracy the mean over the tasks
    of the grid; a point lacking a task is left out, so every point averages the same tasks."""
    tasks = {r["task"] for r in rows}
    cells: dict = {}
    for r in rows:
        label = ", ".join(str(r[a]) for a in series) or "pruned"
        cells.setdefault((label, r["removed"]), []).append(r)
    lines: dict = {}
    for (label, _), group in cells.items():
        if {r["task"] for r in group} != tasks or any(r.get("params_ratio") is None for r in group):
            continue
        mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
        lat = [r.get("latency_ratio") for r in group]
        lines.setdefault(label, []).append((mean("params_ratio"), sum(lat) / len(lat) if all(lat) else None,
                                            mean("pruned_ft")))
    dense_by_task = {r["task"]: r["dense_ft"] for r in rows if r.get("dense_ft") is not None}
    dense = (1.0, 1.0, sum(dense_by_task.values()) / len(dense_by_task)) if set(dense_by_task) == tasks else None
    return {k: sorted(v) for k, v in lines.items()}, dense


def plot_pareto(rows: list[dict], series: list[str], path: Path) -> Path:
    """Accuracy after fine-tuning against the fraction of parameters kept and against the measured prefill
    latency ratio, one line per label of ``series`` (all layer counts of the grid), dense as a star."""
    plt = _plt()
    lines, dense = pareto_points(rows, series)
    n_tasks = len({r["task"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for i, (ax, xlabel) in enumerate(zip(axes, ("parameters (fraction of dense)", "prefill latency (ratio to dense, as measured at evaluation)"))):
        for label, pts in lines.items():
            pts = [p for p in pts if p[i] is not None]
            ax.plot([p[i] for p in pts], [p[2] for p in pts], marker="o", label=label)
        if dense is not None:
            ax.plot([dense[i]], [dense[2]], marker="*", ms=14, color="k", linestyle="none", label="dense, fine-tuned")
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("accuracy after fine-tuning" + (f" (mean of {n_tasks} tasks)" if n_tasks > 1 else ""))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
