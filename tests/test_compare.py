"""`gradpruner compare` on a tiny model: the grid, the shared store, reuse of earlier runs, the table."""
import csv
import json

import pytest
import yaml

from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.pipeline.compare import load_grid, run_grid
from gradpruner.pipeline.config import config_from_dict
from gradpruner.pipeline.run import run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _base(model) -> dict:
    return {"model": str(model), "task": "arc_easy", "out": "unused", "seed": 0,
            "score": {"steps": 2, "batch_size": 4, "max_length": 64, "lr": 1e-3, "calib_examples": 4},
            "plan": {"prune": 3, "merge": 1},
            "finetune": {"mode": "lora", "max_steps": 1, "batch_size": 4, "max_length": 64, "limit": 16},
            "eval": {"limit": 4, "batch_size": 4, "pruned_no_finetune": False}}


def _write(tmp_path, model, axes, **extra):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_base(model)))
    spec = {"base": "base.yaml", "out": str(tmp_path / "cmp"), "axes": axes, **extra}
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "cmp.yaml"


METHODS = {"gradpruner": {}, "last_n": {"score.method": "last_n", "plan.merge": 0},
           "laco": {"score.method": "laco", "plan.merge": 3, "prune.merge_rule": "laco", "score.laco_threshold": -1}}


def test_compare_grid_shares_stages_and_writes_the_table(tiny_llama, tmp_path):
    path = _write(tmp_path, tiny_llama, {"task": {"key": "task", "values": ["arc_easy"]}, "method": METHODS})
    log: list[str] = []
    table = run_grid(path, echo=log.append, isolate=False)
    ran = [m.split("→ ")[1] for m in log if "→ " in m]
    assert ran.count("dense_ft") == 1 and ran.count("eval_dense_ft") == 1  # shared by the three cells
    assert ran.count("score") == 3 and ran.count("pruned_ft") == 3
    rows = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert [r["method"] for r in rows] == ["gradpruner", "last_n", "laco"]  # the axis labels
    assert [r["score_method"] for r in rows] == ["igia_guarded", "last_n", "laco"] and [r["merged"] for r in rows] == [1, 0, 3]
    assert all(0 <= r["pruned_ft"] <= 1 and r["removed"] == 3 for r in rows)
    last_n = rows[1]
    plan = json.loads((tmp_path / "cmp" / "cells" / "task=arc_easy,method=last_n" / "plan.json").read_text())
    assert plan["drop"] == [5, 6, 7]
    md = table.read_text()
    assert "| method | arc_easy | avg |" in md and "| last_n |" in md and "![accuracy](accuracy.png)" in md
    assert "![pareto](pareto.png)" in md and (tmp_path / "cmp" / "pareto.png").stat().st_size > 1000
    assert all(0 < r["latency_ratio"] for r in rows)  # measured prefill of the pruned vs the dense model
    assert "Δ vs" not in md and "reference" not in rows[0]  # no block_influence cell: no reference, no Δ
    assert len(list(csv.DictReader((tmp_path / "cmp" / "table.csv").open()))) == 3
    assert last_n["dense_ft"] == rows[0]["dense_ft"]
    # a second run computes nothing and gives the same table
    log.clear()
    run_grid(path, echo=log.append, isolate=False)
    assert not [m for m in log if "→ " in m]
    assert json.loads((tmp_path / "cmp" / "table.json").read_text()) == rows


def test_compare_pairs_each_method_with_the_reference(tiny_llama, tmp_path):
    from gradpruner.pipeline.compare import write_table

    methods = {"last_n": {"score.method": "last_n", "plan.merge": 0},
               "block_influence": {"score.method": "block_influence", "plan.merge": 0}}
    path = _write(tmp_path, tiny_llama, {"method": methods}, overrides=["eval.limit=24"])
    table = run_grid(path, echo=lambda m: None, isolate=False)
    cmp = tmp_path / "cmp"
    rows = {r["method"]: r for r in json.loads((cmp / "table.json").read_text())}
    ev = {m: json.loads((cmp / "cells" / f"method={m}" / "eval" / "pruned_ft.json").read_text()) for m in methods}
    assert all(len(e["item_scores"]["values"]) == e["n"] == 24 for e in ev.values())
    assert all(sum(e["item_scores"]["values"]) / e["n"] == pytest.approx(e["value"]) for e in ev.values())
    last = rows["last_n"]
    assert last["reference"] == "block_influence" and last["delta_vs_reference_note"] is None
    assert last["delta_vs_reference"] == pytest.approx(ev["last_n"]["value"] - ev["block_influence"]["value"])
    assert last["delta_vs_reference_low"] <= last["delta_vs_reference"] <= last["delta_vs_reference_high"]
    assert last["delta_vs_reference_avg"] == pytest.approx(last["delta_vs_reference"])  # one task
    ref = rows["block_influence"]
    assert (ref["delta_vs_reference"], ref["delta_vs_reference_low"], ref["delta_vs_reference_high"]) == (0, 0, 0)
    md = table.read_text()
    assert "| method | arc_easy | avg | Δ vs block_influence (arc_easy) | Δ vs block_influence (avg) |" in md

    def signed(v):
        return f"{0.0 if abs(v) < 5e-4 else v:+.3f}".replace("-", "−")

    shown = (f"{signed(last['delta_vs_reference'])} [{signed(last['delta_vs_reference_low'])}, "
             f"{signed(last['delta_vs_reference_high'])}]")
    assert f"| last_n | {last['pruned_ft']:.3f} | {last['pruned_ft']:.3f} | {shown} | {shown} |" in md
    assert "| Δ vs block_influence |" in md and "excludes 0" in md
    csv_rows = list(csv.DictReader((cmp / "table.csv").open()))
    assert float(csv_rows[0]["delta_vs_reference"]) == pytest.approx(last["delta_vs_reference"])
    # an evaluation from before per-item scores were kept: –, and a footnote says why
    cells = load_grid(path)[1]
    before = md
    for m in methods:
        f = cmp / "cells" / f"method={m}" / "eval" / "pruned_ft.json"
        e = json.loads(f.read_text())
        e.pop("item_scores")
        f.resolve().write_text(json.dumps(e))
    md = write_table(cmp, cells).read_text()
    rows = {r["method"]: r for r in json.loads((cmp / "table.json").read_text())}
    assert rows["last_n"]["delta_vs_reference"] is None and "no per-item scores" in rows["last_n"]["delta_vs_reference_note"]
    assert f"| last_n | {last['pruned_ft']:.3f} | {last['pruned_ft']:.3f} | – | – |" in md
    assert "- no per-item scores" in md and "method=last_n, method=block_influence" in md
    plain = write_table(cmp, cells, reference=None).read_text()  # no reference: the table as before
    assert "Δ" not in plain and all(line in before for line in plain.splitlines() if not line.startswith("|"))
    table_lines = [(p, m) for p, m in zip(*[[x for x in t.splitlines() if x.startswith("|")] for t in (plain, before)])]
    assert len(table_lines) == plain.count("\n|") and all(m.startswith(p) for p, m in table_lines)  # Δ columns appended
    # the reference can be named; one that is no label is refused
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "reference": "blok_influence"}))
    with pytest.raises(GradPrunerError, match="reference 'blok_influence' is not a label.*block_influence, last_n"):
        load_grid(path)
    path.write_text(yaml.safe_dump({**spec, "reference": "last_n"}))
    assert main(["compare", str(path), "--table-only"]) == 0
    assert "| Δ vs last_n |" in (cmp / "table.md").read_text()


def test_compare_reuses_an_earlier_run_folder(tiny_llama, tmp_path):
    cfg = config_from_dict(_base(tiny_llama), [f"out={tmp_path / 'earlier'}"])
    run(cfg, echo=lambda m: None, isolate=False)
    path = _write(tmp_path, tiny_llama, {"method": {"gradpruner": {}}}, reuse=[str(tmp_path / "earlier")])
    log: list[str] = []
    run_grid(path, echo=log.append, isolate=False)
    assert not [m for m in log if "→ " in m]  # every stage had the same key in the earlier folder
    assert sum("reused from" in m for m in log) == 8


def test_compare_validates_every_cell_before_running(tiny_llama, tmp_path):
    bad = {"igia": {}, "typo": {"score.method": "block_influense", "plan.merge": 0},
           "merge_without_factors": {"score.method": "taylor"}}
    path = _write(tmp_path, tiny_llama, {"method": bad})
    with pytest.raises(GradPrunerError) as err:
        load_grid(path)
    text = str(err.value)
    assert "cell method=typo" in text and "block_influence" in text
    assert "cell method=merge_without_factors" in text and "plan.merge: 0" in text
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"base": {}, "out": "o", "axes": {"a": [1, 2]}}))
    assert main(["compare", str(tmp_path / "x.yaml")]) == 2


def test_compare_dry_run_lists_cells(tiny_llama, tmp_path, capsys):
    path = _write(tmp_path, tiny_llama, {"task": {"key": "task", "values": ["arc_easy", "piqa"]},
                                         "density": {"key": "prune.density", "values": [0.1, 0.5]}})
    assert main(["compare", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "task=piqa,density=0.5" in out and "4 cells" in out and not (tmp_path / "cmp").exists()


def test_pivot_rows_combine_every_axis_but_task():
    from gradpruner.pipeline.compare import _pivot

    rows = [{"task": t, "method": m, "removed": k, "pruned_ft": v, "dense_ft": 0.6, "dense_zero_shot": 0.5}
            for t, m, k, v in [("a", "x", 9, 0.4), ("a", "x", 12, 0.3), ("b", "x", 9, 0.2), ("b", "x", 12, 0.1)]]
    table = _pivot(rows, ["method", "removed"])
    assert table[0] == ["method, removed", "a", "b", "avg"]
    assert table[3] == ["x, 9", "0.400", "0.200", "0.300"] and table[4] == ["x, 12", "0.300", "0.100", "0.200"]


def test_stage_keys_of_published_results_stay_valid(tmp_path):
    """Config keys added later (eval.offset, the IGIA variants' method names, …) must leave the keys of
    runs made before them unchanged, or every published result would be recomputed."""
    from pathlib import Path

    from gradpruner.pipeline.config import load_config
    from gradpruner.pipeline.run import Run

    root = Path(__file__).resolve().parents[1]
    recorded = root / "results" / "smollm2_arc_easy" / "stages"
    cfg = load_config(root / "configs" / "smollm2_arc_easy.yaml", [f"out={tmp_path / 'run'}"])
    keys = Run(cfg, echo=lambda *_: None, isolate=False).keys
    for rec in sorted(recorded.glob("*.json")):
        assert json.loads(rec.read_text())["key"] == keys[rec.stem], rec.stem
    shifted = Run(load_config(root / "configs" / "smollm2_arc_easy.yaml", [f"out={tmp_path / 'v'}", "eval.offset=250"]),
                  echo=lambda *_: None, isolate=False).keys
    assert shifted["eval_pruned_ft"] != keys["eval_pruned_ft"] and shifted["pruned_ft"] == keys["pruned_ft"]


def test_pareto_points_average_the_tasks_per_method_and_size():
    from gradpruner.report.plots import pareto_points

    def row(method, task, removed, acc, params, lat, dense):
        return {"method": method, "task": task, "removed": removed, "pruned_ft": acc, "params_ratio": params,
                "latency_ratio": lat, "dense_ft": dense}

    rows = [row("a", "t1", 6, 0.6, 0.8, 0.7, 0.7), row("a", "t2", 6, 0.4, 0.8, 0.9, 0.5),
            row("a", "t1", 12, 0.5, 0.6, 0.5, 0.7), row("a", "t2", 12, 0.3, 0.6, 0.7, 0.5),
            row("b", "t1", 6, 0.2, 0.8, 0.8, 0.7)]  # b lacks t2 at 6: left out
    lines, dense = pareto_points(rows, ["method"])
    assert lines == {"a": [(pytest.approx(0.6), pytest.approx(0.6), pytest.approx(0.4)),
                           (pytest.approx(0.8), pytest.approx(0.8), pytest.approx(0.5))]}
    assert dense == (1.0, 1.0, pytest.approx(0.6))
