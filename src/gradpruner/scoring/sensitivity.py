"""Gradient sensitivity analysis (GradPruner, Fig. 2): how early does the layer ranking settle?

Scoring costs T LoRA optimizer steps; the paper argues a small T suffices because the ranking of
layers stops changing early. ``gradpruner score`` writes ``step_layer_sq_norms`` (T lists of
per-layer Σ_modules ‖grad_B_i grad_A_i‖²_F), so the score after any s ≤ T steps can be recomputed
without rerunning anything. For each s we compare the k layers a plan would act on with those
chosen by a reference (the full run, or a longer run's ``scores.json``):

* ``overlap``  = |sel_s ∩ sel_ref| / k — what pruning actually depends on;
* ``spearman`` = rank correlation of the whole score vector — how settled the full ranking is.

By default the selection is the k LEAST important layers (``which="bottom"``), the ones a plan would
remove; ties go to the lower index, as in ``planning``'s stable sort. Only the paper's ``igia`` rule
is covered: the release's ``igia_norm`` (Σ_i sqrt of per-MODULE sq norms) cannot be rebuilt from
per-layer sums.

Intended command (CLI wiring lives elsewhere)::

    gradpruner sensitivity SCORES.json --k 12 [--reference LONG/scores.json] [--which bottom] [--out DIR]

which calls ``sensitivity(scores, k, reference_path, which, out_dir)`` and prints ``format_curve``.
"""
from __future__ import annotations

import math
from pathlib import Path

from gradpruner.errors import GradPrunerError
from gradpruner.util.atomic import read_json, write_json

WHICH = ("bottom", "top")


def cumulative_scores(step_layer: list[list[float]]) -> list[list[float]]:
    """Score after s steps for s = 1..T: the mean of the first s per-step rows (the paper's Eq. 3)."""
    out, running = [], None
    for s, row in enumerate(step_layer, start=1):
        running = list(row) if running is None else [a + b for a, b in zip(running, row)]
        out.append([v / s for v in running])
    return out


def _order(scores: list[float], which: str) -> list[int]:
    """Layer indices by importance; stable, so equal scores keep the lower index first."""
    if which not in WHICH:
        raise GradPrunerError(f"Unknown selection {which!r}; choose 'bottom' (layers a plan removes) or 'top'.")
    sign = 1.0 if which == "bottom" else -1.0
    return sorted(range(len(scores)), key=lambda i: (sign * scores[i], i))


def select(scores: list[float], k: int, which: str = "bottom") -> set[int]:
    """The k layers with the lowest (``bottom``) or highest (``top``) scores, ties to the lower index."""
    return set(_order(scores, which)[:k])


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing their average rank (as scipy.stats.rankdata 'average')."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho with average ranks; None when either vector is constant (rho is undefined)."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _check_k(k, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise GradPrunerError(f"k={k!r} is out of range for {n} layers; choose a whole number from 1 to {n - 1}.")


def agreement_curve(step_layer: list[list[float]], k: int, reference: list[float] | None = None,
                    which: str = "bottom", reference_steps: int | None = None) -> dict:
    """Overlap and Spearman of the score after each step s against a reference ranking.

    ``reference`` defaults to the score after the last step; pass another run's ``layer_scores`` to
    compare with a longer run (``reference_steps`` then records its T, for the report only).
    """
    cum = cumulative_scores(step_layer)
    if not cum:
        raise GradPrunerError("There are no scoring steps to analyse; score with --steps of at least 2.")
    n = len(cum[-1])
    _check_k(k, n)
    if reference is None:
        reference, reference_steps = cum[-1], len(cum)
    elif len(reference) != n:
        raise GradPrunerError(f"The reference has {len(reference)} layer scores but the run has {n}; "
                              "compare scores of the same model.")
    ref_sel = select(reference, k, which)
    return {
        "steps": list(range(1, len(cum) + 1)),
        "overlap": [len(select(c, k, which) & ref_sel) / k for c in cum],
        "spearman": [spearman(c, reference) for c in cum],
        "reference_steps": reference_steps,
        "reference_selection": sorted(ref_sel),
        "k": k,
        "which": which,
    }


def first_stable_step(curve: dict, threshold: float = 1.0) -> int | None:
    """The first step s from which overlap stays ≥ threshold through the last step (None if never)."""
    stable = None
    for s, ov in zip(reversed(curve["steps"]), reversed(curve["overlap"])):
        if ov < threshold:
            break
        stable = s
    return stable


def _step_rows(data: dict, path) -> list[list[float]]:
    """Validated ``step_layer_sq_norms``: a non-empty T×num_layers table of finite values ≥ 0."""
    rows = data.get("step_layer_sq_norms") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise GradPrunerError(f"Scores file {path} has no step_layer_sq_norms; rescore it with this version of "
                              "gradpruner score.")
    n = data.get("num_layers", len(rows[0]) if isinstance(rows[0], list) else None)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, list) or len(row) != n:
            raise GradPrunerError(f"Scores file {path}: step_layer_sq_norms step {i} does not hold {n} layer "
                                  "values; regenerate the file with gradpruner score.")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise GradPrunerError(f"Scores file {path}: step_layer_sq_norms step {i} holds {v!r}, not a "
                                      "finite value ≥ 0; regenerate the file with gradpruner score.")
    return [[float(v) for v in row] for row in rows]


def _reference_scores(path, n: int) -> tuple[list[float], int | None]:
    """A longer run's final layer scores (igia), checked against this run's layer count."""
    data = read_json(path, "Reference scores file")
    if isinstance(data, dict) and "step_layer_sq_norms" in data:
        rows = _step_rows(data, path)
        scores, steps = cumulative_scores(rows)[-1], len(rows)
    else:
        scores = data.get("layer_scores") if isinstance(data, dict) else None
        steps = data.get("steps") if isinstance(data, dict) else None
        if not isinstance(scores, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores):
            raise GradPrunerError(f"Reference scores file {path} has no finite layer_scores; pass a scores.json "
                                  "written by gradpruner score.")
    if len(scores) != n:
        raise GradPrunerError(f"Reference scores file {path} has {len(scores)} layers but the scores being "
                              f"analysed have {n}; use a reference from the same model.")
    return [float(v) for v in scores], steps


def plot_curve(curve: dict, path: Path) -> Path:
    """Two panels sharing the step axis: top-k overlap (what pruning sees) and Spearman (whole ranking)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = curve["steps"]
    rho = [math.nan if r is None else r for r in curve["spearman"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
    ax1.plot(steps, curve["overlap"], marker="o", ms=3, color="tab:blue")
    ax1.set_ylim(-0.05, 1.05)
    label = "least" if curve["which"] == "bottom" else "most"
    ax1.set_ylabel(f"overlap, {curve['k']} {label}\nimportant layers")
    ax2.plot(steps, rho, marker="o", ms=3, color="tab:orange")
    ax2.set_ylim(-1.05, 1.05)
    ax2.set_ylabel("Spearman rho")
    ax2.set_xlabel("scoring step s")
    ref = curve["reference_steps"]
    fig.suptitle(f"Top-{curve['k']} agreement with " + (f"step {ref}" if ref else "the reference"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sensitivity(scores_path, k: int, reference_path=None, which: str = "bottom", out_dir=None) -> dict:
    """Read a scores.json, build the agreement curve, and optionally write sensitivity.json/.png."""
    data = read_json(scores_path, "Scores file")
    rows = _step_rows(data, scores_path)
    n = len(rows[0])
    _check_k(k, n)
    reference, ref_steps = (None, None) if reference_path is None else _reference_scores(reference_path, n)
    curve = agreement_curve(rows, k, reference, which, reference_steps=ref_steps)
    result = {**curve, "first_stable_step": first_stable_step(curve), "rule": "igia", "num_layers": n,
              "scores": str(scores_path), "reference": None if reference_path is None else str(reference_path)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "sensitivity.json", result)
        plot_curve(result, out_dir / "sensitivity.png")
    return result


def format_curve(curve: dict, max_rows: int = 20) -> str:
    """A short terminal table (step, overlap, spearman), evenly thinned to at most ``max_rows`` rows."""
    t = len(curve["steps"])
    idx = range(t) if t <= max_rows else sorted({round(i * (t - 1) / (max_rows - 1)) for i in range(max_rows)})
    lines = [f"  {'step':>5}  {'overlap':>7}  {'spearman':>8}"]
    for i in idx:
        rho = curve["spearman"][i]
        lines.append(f"  {curve['steps'][i]:>5}  {curve['overlap'][i]:>7.3f}  {'-' if rho is None else f'{rho:8.3f}':>8}")
    stable = curve.get("first_stable_step", first_stable_step(curve))
    lines.append(f"  {curve['which']}-{curve['k']} selection stable from step: {stable if stable else 'never'}")
    return "\n".join(lines)
