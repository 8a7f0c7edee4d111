"""``gradpruner compare``: one grid of pipeline runs (methods × tasks, or one ablation axis) with
identical budgets, and the table of their results in the layout of the paper's Table 1.

A compare config names a base run config and the axes of the grid::

    base: smollm2_arc_easy.yaml          # a run config (relative to this file) or an inline mapping
    out: results/compare_methods
    store: results/store                 # optional (default OUT/store): share it between compare configs
    reuse: [results/smollm2_arc_easy]    # optional: earlier run folders whose finished stages are taken
    overrides: [finetune.max_steps=150]  # applied to every cell
    reference: block_influence           # optional (this is the default): the label the others are paired with
    axes:
      method:                            # long form: label -> overrides of that cell
        igia: {}
        block_influence: {score.method: block_influence, plan.merge: 0}
      task:                              # short form: one key, a list of values
        key: task
        values: [arc_easy, piqa]

Every cell is a normal run folder ``OUT/cells/<axis=label,...>``; stage outputs live once in
``OUT/store`` under their keys, so the dense fine-tune of a task and the IGIA scores are computed
once and a finished cell is never recomputed. The table is written after every cell. When an axis
has the ``reference`` label, the table adds each cell's difference to the reference cell with the same
other labels, with a paired bootstrap 95% interval over the same held-out items (``evaluation.stats``).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import time
from pathlib import Path

from gradpruner.errors import Collect, GradPrunerError
from gradpruner.evaluation.stats import paired_bootstrap, paired_bootstrap_tasks, paired_scores
from gradpruner.pipeline.config import RunConfig, config_from_dict, read_yaml_mapping
from gradpruner.report.pages import write_page
from gradpruner.util.atomic import atomic_file, write_json

EVAL_NAMES = ("dense_zero_shot", "dense_ft", "pruned", "pruned_ft")


def _axis(name: str, spec) -> list[tuple[str, list[str]]]:
    """An axis as [(label, ["key=value", ...]), ...] from its long or short form."""
    if isinstance(spec, dict) and set(spec) == {"key", "values"} and isinstance(spec["values"], list):
        return [(str(v), [f"{spec['key']}={json.dumps(v, default=str)}"]) for v in spec["values"]]
    if isinstance(spec, dict) and spec and all(isinstance(v, dict) or v is None for v in spec.values()):
        return [(str(label), [f"{k}={json.dumps(v, default=str)}" for k, v in (ov or {}).items()]) for label, ov in spec.items()]
    raise GradPrunerError(f"Compare axis {name!r} must map labels to overrides ({{label: {{key: value}}}}) or be "
                          "{key: KEY, values: [...]}; see docs/commands.md#compare.")


def _plain_path(value, key: str) -> Path:
    """A compare config path that stays below the working folder: no '..', no NUL or control characters."""
    text = str(value)
    if not text.isprintable() or ".." in Path(text).parts:
        raise GradPrunerError(f"Compare {key} {text!r} must be a plain path without '..' or control characters; "
                              "give a folder below the working folder.")
    return Path(text)


KEYS = {"base", "out", "overrides", "axes", "store", "reuse", "reference"}
DEFAULT_REFERENCE = "block_influence"  # the label every cell is paired with, when an axis has it


def _grid_spec(path: Path) -> tuple[dict, dict, Path, list[str]]:
    """(compare config, base run config, out folder, problems with the config's own keys)."""
    spec = read_yaml_mapping(path, "Compare config")
    unknown = set(spec) - KEYS
    if unknown:
        raise GradPrunerError(f"Compare config {path} has unknown key(s) {sorted(map(str, unknown))}; use {', '.join(sorted(KEYS))}.")
    base = spec.get("base", {})
    if isinstance(base, str):
        base = read_yaml_mapping(path.parent / base, "Base config")
    if not isinstance(base, dict) or not spec.get("out") or not isinstance(spec.get("axes"), dict) or not spec["axes"]:
        raise GradPrunerError(f"Compare config {path} needs base (a run config), out (a folder) and axes (at least one).")
    check = Collect()
    out = check(_plain_path, spec["out"], "out") or Path(str(spec["out"]))
    if spec.get("store") is not None:
        check(_plain_path, spec["store"], "store")
    for key in ("overrides", "reuse"):
        value = spec.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            check.problems.append(f"Compare {key} must be a list of strings, not {value!r}.")
            spec = {**spec, key: []}
    return spec, base, out, check.problems


def load_grid(path: str | Path, extra: list[str] = ()) -> tuple[Path, list[tuple[dict, RunConfig]]]:
    """Read a compare config; return the output folder and every cell's (labels, validated config).

    All cells are validated before anything runs, and every problem is reported at once."""
    spec, base, out, problems = _grid_spec(Path(path))
    common = list(spec.get("overrides") or []) + list(extra)
    axes = {}
    for name, axis in spec["axes"].items():
        try:
            axes[name] = _axis(name, axis)
        except GradPrunerError as exc:
            problems += exc.problems
    if len(axes) < len(spec["axes"]):  # the cells cannot be told without every axis
        raise GradPrunerError(*problems)
    cells = []
    for combo in itertools.product(*axes.values()):
        labels = {name: label for name, (label, _) in zip(axes, combo)}
        name = ",".join(f"{a}={label}" for a, label in labels.items())
        if any(c in name for c in "/\\") or name.startswith(".") or not name.isprintable():
            problems.append(f"Compare cell name {name!r} may not contain '/', '\\' or control characters; rename the labels.")
            continue
        overrides = common + [o for _, ovs in combo for o in ovs] + [f"out={json.dumps(str(out / 'cells' / name))}"]
        try:
            cells.append((labels, config_from_dict(base, overrides)))
        except GradPrunerError as exc:
            problems += [f"cell {name}: {p}" for p in exc.problems]
    if "reference" in spec and spec["reference"] is not None:
        problems += _reference_problems(spec["reference"], axes)
    if problems:
        raise GradPrunerError(*problems)
    return out, cells


def _reference_problems(reference, axes: dict[str, list]) -> list[str]:
    """A ``reference`` the compare config names must be the label of exactly one axis other than task."""
    if not isinstance(reference, (str, int, float)) or isinstance(reference, bool):
        return [f"Compare reference must be one label (a string), not {reference!r}."]
    hits = [name for name, axis in axes.items() if name != "task" and str(reference) in [label for label, _ in axis]]
    if len(hits) == 1:
        return []
    labels = sorted({label for name, axis in axes.items() if name != "task" for label, _ in axis})
    if not hits:
        return [(f"Compare reference {str(reference)!r} is not a label of an axis other than task; choose one of: "
                 f"{', '.join(labels) or '(none: add an axis)'}.")]
    return [f"Compare reference {str(reference)!r} is a label of several axes ({', '.join(hits)}); rename the labels."]


def reference_of(path: str | Path) -> str:
    """The label a compare config pairs every cell with (``reference``, default block_influence)."""
    value = read_yaml_mapping(Path(path), "Compare config").get("reference")
    return DEFAULT_REFERENCE if value is None else str(value)


def _preflight(cells) -> None:
    """Every distinct model and data source of the grid checked before the first cell runs."""
    from gradpruner.pipeline.run import preflight

    seen, problems = set(), []
    for _, cfg in cells:
        key = (cfg.model, cfg.task, cfg.data, cfg.eval_data, cfg.data_dir)
        if key not in seen:
            seen.add(key)
            try:
                preflight(cfg)
            except GradPrunerError as exc:
                problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise GradPrunerError(*problems)


def run_grid(path: str | Path, extra: list[str] = (), echo=print, isolate: bool = True) -> Path:
    """Run every cell that is not finished (finished stages are reused); return the table path."""
    from gradpruner.pipeline.run import run

    out, cells = load_grid(path, extra)
    _preflight(cells)
    spec = read_yaml_mapping(Path(path), "Compare config")
    store = Path(str(spec["store"])) if spec.get("store") is not None else out / "store"
    reuse = [Path(p) for p in spec.get("reuse") or []]
    out.mkdir(parents=True, exist_ok=True)
    text = Path(path).read_text(encoding="utf-8")
    with atomic_file(out / "compare.yaml") as fh:
        fh.write(text + (f"\n# command-line overrides: {list(extra)}\n" if extra else ""))
    started, worked = time.monotonic(), []  # seconds of cells that computed something (for the ETA)
    for i, (labels, cfg) in enumerate(cells, 1):
        so_far = time.monotonic() - started
        eta = f", ETA ≈{sum(worked) / len(worked) * (len(cells) - i + 1) / 60:.0f} min" if worked else ""
        echo(f"[{i}/{len(cells)}] {Path(cfg.out).name} ({so_far / 60:.1f} min so far{eta})")
        t0, log = time.monotonic(), []
        run(cfg, echo=lambda m: (log.append(m), echo(m)), isolate=isolate, store=store, reuse=reuse,
            checked=True)  # _preflight above
        if any("→ " in m for m in log):
            worked.append(time.monotonic() - t0)
        write_table(out, cells, reference_of(path))
    return write_table(out, cells, reference_of(path))


# --- the table ----------------------------------------------------------------------------

def _cell_row(labels: dict, cfg: RunConfig) -> dict:
    d = Path(cfg.out)
    row = {}
    evals = {n: json.loads((d / "eval" / f"{n}.json").read_text()) for n in EVAL_NAMES
             if (d / "eval" / f"{n}.json").is_file()}
    plan = json.loads((d / "plan.json").read_text()) if (d / "plan.json").is_file() else {}
    stages = {p.stem: json.loads(p.read_text()) for p in (d / "stages").glob("*.json") if not p.name.startswith(".")
              and not p.name.endswith(".started.json")} if (d / "stages").is_dir() else {}
    any_eval = next(iter(evals.values()), {})
    row.update({"task": cfg.task or cfg.data, "score_method": cfg.score.method, "metric": any_eval.get("metric"),
                "removed": len(plan["drop"]) if plan else None, "merged": len(plan.get("merge", {})) if plan else None,
                "merge_rule": cfg.prune.merge_rule if plan.get("merge") else None,
                "density": cfg.prune.density if plan.get("merge") else None})
    for n in EVAL_NAMES:
        row[n] = evals[n]["value"] if n in evals else None
    if "dense_ft" in evals and "pruned_ft" in evals:
        row["delta_vs_dense_ft"] = row["pruned_ft"] - row["dense_ft"]
        row["params_ratio"] = evals["pruned_ft"]["params"]["total"] / evals["dense_ft"]["params"]["total"]
        lat = [evals[n].get("latency", {}).get("prefill_s") for n in ("pruned_ft", "dense_ft")]
        row["latency_ratio"] = lat[0] / lat[1] if all(lat) else None  # one 128-token prompt, as measured
    row["n"] = evals["pruned_ft"]["n"] if "pruned_ft" in evals else None
    row["score_s"] = stages.get("score", {}).get("usage", {}).get("seconds")
    row["pruned_ft_s"] = stages.get("pruned_ft", {}).get("usage", {}).get("seconds")
    row["dense_ft_s"] = stages.get("dense_ft", {}).get("usage", {}).get("seconds")
    for name in ("dense_ft", "pruned_ft"):  # where the fine-tune started and ended: how broken the start was
        rec = d / f"{name}_finetune.json"
        ft = json.loads(rec.read_text()) if rec.is_file() else {}
        curve = ft.get("loss_curve")
        row[f"{name}_loss_first"] = curve[0]["loss"] if curve else None
        row[f"{name}_loss_last"] = ft.get("final_loss") if curve else None
    return {**row, **labels}  # an axis named like a column (e.g. "merged") shows its label


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _pivot(rows: list[dict], axes: list[str], reference: str | None = None) -> list[list[str]]:
    """Table 1 layout: one row per combination of the non-task ``axes`` (plus the dense model), one
    column per task, Avg; with ``reference`` (rows that have their Δ, from ``_add_deltas``) then one
    "Δ vs REFERENCE (task)" column per task and one for avg."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    label_of = {id(r): ", ".join(str(r[a]) for a in axes) for r in rows}
    labels = list(dict.fromkeys(label_of.values()))
    table = [[", ".join(axes)] + tasks + ["avg"]]
    deltas = [f"Δ vs {reference} ({t})" for t in (*tasks, "avg")] if reference is not None else []
    table[0] += deltas

    def line(name, values):
        got = [v for v in values if v is not None]
        avg = sum(got) / len(got) if len(got) == len(values) and got else None
        return [name] + [_fmt(v) for v in values] + [_fmt(avg)]

    for base, title in (("dense_zero_shot", "dense, zero-shot"), ("dense_ft", "dense, fine-tuned")):
        vals = [next((r[base] for r in rows if r["task"] == t and r[base] is not None), None) for t in tasks]
        table.append(line(title, vals) + [""] * len(deltas))
    for label in labels:
        vals = [next((r["pruned_ft"] for r in rows if r["task"] == t and label_of[id(r)] == label), None) for t in tasks]
        extra = []
        if deltas:
            mine = {r["task"]: r for r in rows if label_of[id(r)] == label}
            extra = [_interval(mine[t]) if t in mine else "–" for t in tasks] + [_interval(next(iter(mine.values())), "_avg")]
        table.append(line(label, vals) + extra)
    return table


DELTA_COLS = ("reference", "delta_vs_reference", "delta_vs_reference_low", "delta_vs_reference_high",
              "delta_vs_reference_avg", "delta_vs_reference_avg_low", "delta_vs_reference_avg_high")
UNFINISHED = "not finished (this cell or its reference cell)"


def _signed(v: float) -> str:
    return f"{0.0 if abs(v) < 5e-4 else v:+.3f}".replace("-", "−")


def _interval(row: dict, which: str = "") -> str:
    """'+0.032 [−0.010, +0.071]' from a row's delta_vs_reference{which}, _low, _high; – without one."""
    mean = row.get(f"delta_vs_reference{which}")
    if mean is None:
        return "–"
    return f"{_signed(mean)} [{_signed(row[f'delta_vs_reference{which}_low'])}, {_signed(row[f'delta_vs_reference{which}_high'])}]"


def _pruned_ft_eval(cfg: RunConfig) -> dict | None:
    path = Path(cfg.out) / "eval" / "pruned_ft.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _add_deltas(rows: list[dict], cells: list[tuple[dict, RunConfig]], reference: str | None) -> str | None:
    """Add to every row its pruned+FT difference to the reference cell (the same labels but the
    reference's on its axis), paired over the same items with a bootstrap 95% interval, and the same for the
    mean over tasks, each task resampled within itself (``_avg``); ``delta_vs_reference_note`` says why one is missing.
    Returns the reference's axis, or None (no axis has the label: the rows stay as they were)."""
    axis = next((a for a in (list(cells[0][0]) if cells else []) if a != "task"
                 and any(labels[a] == reference for labels, _ in cells)), None)
    if axis is None:
        return None
    evals = [_pruned_ft_eval(cfg) for _, cfg in cells]
    where = {tuple(labels.items()): i for i, (labels, _) in enumerate(cells)}
    pairs: list[tuple[list, list] | str] = []
    for labels, e in zip((labels for labels, _ in cells), evals):
        j = where.get(tuple({**labels, axis: reference}.items()))
        try:
            if e is None or j is None or evals[j] is None:
                raise GradPrunerError(UNFINISHED)
            pairs.append(paired_scores(e, evals[j]))
        except GradPrunerError as exc:
            pairs.append(str(exc))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    groups: dict[tuple, list[int]] = {}
    for i, (labels, _) in enumerate(cells):
        groups.setdefault(tuple((a, v) for a, v in labels.items() if a != "task"), []).append(i)
    for members in groups.values():
        got = {rows[i]["task"]: pairs[i] for i in members}
        missing = next((p for p in (got.get(t, UNFINISHED) for t in tasks) if isinstance(p, str)), None)
        avg = paired_bootstrap_tasks([got[t] for t in tasks]) if missing is None else (None, None, None)
        for i in members:
            mean = paired_bootstrap(*pairs[i]) if not isinstance(pairs[i], str) else (None, None, None)
            rows[i].update({"reference": reference, **dict(zip(DELTA_COLS[1:], (*mean, *avg))),
                            "delta_vs_reference_note": pairs[i] if isinstance(pairs[i], str) else None})
    return axis


def _delta_notes(rows: list[dict], axes: list[str], reference: str, axis: str) -> list[str]:
    """The table's words on the Δ columns: what they are, and why a cell shows –."""
    parts = [(f"Δ vs {reference}: the pruned and fine-tuned model's metric minus that of the cell with "
              f"{axis}={reference} and the same other labels, on the same held-out items, with a paired bootstrap "
              "95% interval (10,000 resamples of the items). A difference is resolved only when its interval "
              "excludes 0. The avg column is the mean of the tasks' differences (each task weighs the same, as in the avg "
              "of the accuracies), its interval resampling every task's items within that task."), ""]
    why: dict[str, list[str]] = {}
    for r in rows:
        if r.get("delta_vs_reference_note"):
            why.setdefault(r["delta_vs_reference_note"], []).append(
                ",".join(f"{a}={r[a]}" for a in axes))
    if why:
        parts += [f"Δ vs {reference} shows – where no interval could be formed:", ""]
        parts += [f"- {reason}: {', '.join(names)}" for reason, names in why.items()] + [""]
    return parts


LONG_COLS = ("score_method", "metric", "removed", "merged", "merge_rule", "density", "dense_zero_shot", "dense_ft", "pruned",
             "pruned_ft", "delta_vs_dense_ft", "params_ratio", "latency_ratio", "n", "score_s", "pruned_ft_s", "dense_ft_s",
             "pruned_ft_loss_first", "pruned_ft_loss_last", "dense_ft_loss_first", "dense_ft_loss_last")


def write_table(out: Path, cells: list[tuple[dict, RunConfig]], reference: str | None = DEFAULT_REFERENCE) -> Path:
    """table.md (Table 1 layout + every cell), table.csv, table.json and plots in ``out``; when an axis
    has the label ``reference``, each cell's paired difference to it (``_add_deltas``) too."""
    rows = [_cell_row(labels, cfg) for labels, cfg in cells]
    axes = list(cells[0][0]) if cells else []
    ref_axis = _add_deltas(rows, cells, reference)
    write_json(out / "table.json", rows)
    cols = axes + [c for c in ("task", *LONG_COLS) if c not in axes]
    md_cols = list(cols)
    if ref_axis is not None:
        cols += [c for c in DELTA_COLS if c not in axes]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    with atomic_file(out / "table.csv") as tmp:
        tmp.write(buf.getvalue())
    blocks = [("h1", f"Comparison: {out}"),
              ("p", "Accuracy (the task's metric) after fine-tuning the pruned model; every cell ran with the same data, "
                    "fine-tuning budget and held-out items. Cells not finished show –. latency_ratio: the pruned model's "
                    "prefill time for one 128-token prompt over the dense model's, each timed during its own "
                    "evaluation, so on a busy machine it moves with the load (`gradpruner bench` times both side by "
                    "side).")]
    others = [a for a in axes if a != "task"]
    if others:
        shown = reference if ref_axis is not None else None
        blocks += [("h2", f"By {', '.join(others)} (paper Table 1 layout)"), ("table", _pivot(rows, others, shown))]
    every = [md_cols + ([f"Δ vs {reference}"] if ref_axis is not None else [])]
    every += [[_fmt(r.get(c)) for c in md_cols] + ([_interval(r)] if ref_axis is not None else []) for r in rows]
    blocks += [("h2", "Every cell"), ("table", every)]
    if ref_axis is not None:
        blocks += [("p", text) for text in _delta_notes(rows, axes, reference, ref_axis) if text]
    blocks += [("img", png, png.stem) for png in _plots(out, rows, axes)]
    return write_page(blocks, out, "table", f"gradpruner compare: {out.name}")[0]


def _plots(out: Path, rows: list[dict], axes: list[str]) -> list[Path]:
    """Grouped bars of pruned+FT accuracy per cell; lines of accuracy vs layers removed if that varies; the
    Pareto picture (accuracy against parameters and latency, one line per method) when sizes vary."""
    from gradpruner.report.plots import plot_accuracy_lines, plot_grouped, plot_pareto

    done = [r for r in rows if r.get("pruned_ft") is not None and r.get("removed") is not None]
    if not done:
        return []
    paths = [plot_grouped(done, axes, out / "accuracy.png")]
    series = [a for a in axes if a not in ("task", "removed")]  # the layer count is the x axis, not a series
    if len({r["removed"] for r in done}) > 1 and series:
        paths.append(plot_accuracy_lines(done, series[0], out / "accuracy_vs_removed.png"))
    if any(r.get("params_ratio") is not None for r in done):
        paths.append(plot_pareto(done, [a for a in axes if a not in ("task", "removed")], out / "pareto.png"))
    return paths
