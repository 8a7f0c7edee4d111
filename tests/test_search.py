"""`gradpruner search` on a tiny model: the curve, the binary search, the store, the answer, bad input."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.pipeline.config import load_config
from gradpruner.pipeline.search import budget_value, judge, next_probe, search
from gradpruner.scoring.variants import retarget

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, model, **search) -> str:
    cfg = {"model": str(model), "task": "arc_easy", "out": str(tmp_path / "search"), "seed": 0,
           "score": {"steps": 3, "batch_size": 4, "max_length": 96, "lr": 1e-3},
           "finetune": {"max_length": 96, "limit": 32, "batch_size": 4},
           "eval": {"batch_size": 8},
           "search": {"max_drop": 0.5, "val_items": 40, "step": 2, "finetune_points": 2, "finetune_steps": 2, **search}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_search_end_to_end_then_everything_reused(tiny_llama, tmp_path, monkeypatch):
    import gradpruner.evaluation.evaluate as ev

    calls, real = [], ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    log: list[str] = []
    res = search(load_config(_config(tmp_path, tiny_llama)), echo=log.append, isolate=False)
    out = tmp_path / "search"
    # 8 layers: before fine-tuning k = 1, 3 and the top of the range, 8 // 2 = 4
    assert [p["k"] for p in res["before_finetune"]] == [1, 3, 4]
    # 570 ARC-Easy validation questions, one of them also in the training split and left out
    assert res["slice"] == {"offset": 569 - 40, "limit": 40, "n_heldout": 569}
    tuned = res["finetuned"]
    assert 1 <= len(tuned) <= 2 and res["dense_ft"]["n"] == 40
    # the slice is evaluated once per point: dense + 3 before fine-tuning, dense fine-tuned + each probe
    assert len(calls) == 1 + 3 + 1 + len(tuned)
    for p in tuned:  # a probe's value is its run's own evaluation of the slice
        assert p["value"] == json.loads(Path(p["run"], "eval", "pruned_ft.json").read_text())["value"]
    first_k = max([p["k"] for p in res["before_finetune"] if p["within"]], default=1)
    assert tuned[0]["k"] == first_k  # the first probe is the largest k within tolerance before fine-tuning
    for p in tuned:  # a drop is the dense fine-tuned model's accuracy minus the point's, on the same 40 items
        assert p["drop"] == pytest.approx(res["dense_ft"]["value"] - p["value"])
        assert p["within"] == (p["drop"] <= 0.5 + 1e-12)
        lo, hi = p["drop_interval"]
        assert lo <= p["drop"] <= hi
    within = [p["k"] for p in tuned if p["within"]]
    assert res["recommended"] == (max(within) if within else None)
    if within:
        plan = json.loads((out / "plan.json").read_text())
        assert len(plan["drop"]) == res["recommended"] and len(plan["keep"]) == 8 - res["recommended"]
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert len(rows) == 2 + 3 + len(tuned) and {r["phase"] for r in rows} == {"before_finetune", "finetuned"}
    assert (out / "search.png").stat().st_size > 1000
    assert res["verdict"] in (out / "search.md").read_text()

    # a second search with another tolerance kind reuses every point: no stage runs, every point is read back
    log.clear()
    again = search(load_config(_config(tmp_path, tiny_llama, max_drop=None, max_loss=100.0)), echo=log.append,
                   isolate=False)
    assert not [line for line in log if "→ " in line]
    assert sum("reused" in line for line in log) >= 1 + 3 + 1
    assert [p["value"] for p in again["before_finetune"]] == [p["value"] for p in res["before_finetune"]]
    assert all(p["within"] for p in again["finetuned"])  # a loss ratio of 100 is met everywhere


@pytest.mark.parametrize("flags, needle", [
    (["--max-drop", "-0.1"], "--max-drop -0.1"),
    (["--max-drop", "1.5"], "--max-drop 1.5"),
    (["--max-loss", "0.9"], "--max-loss 0.9"),
    (["--max-drop", "0.02", "--budget", "seconds"], "--budget 'seconds' does not exist"),
    ([], "Give exactly one tolerance"),
    (["--max-drop", "0.02", "--max-loss", "1.1"], "Give exactly one tolerance"),
])
def test_bad_settings_fail_before_any_work(tiny_llama, tmp_path, capsys, flags, needle):
    out = tmp_path / "s"
    assert main(["search", "--model", str(tiny_llama), "--task", "arc_easy", "--out", str(out), *flags]) == 2
    assert needle in capsys.readouterr().err and not out.exists()


def test_a_search_flag_given_overrides_the_config_even_at_its_default(tiny_llama, tmp_path, capsys):
    from gradpruner.cli import _search_overrides, build_parser

    # the config sets values other than the flags' defaults (step 2, val_items 320, budget layers, finetune_steps 150)
    path = _config(tmp_path, tiny_llama, step=4, val_items=40, budget="params", finetune_steps=2)

    def searched(*flags):
        args = build_parser().parse_args(["search", "--config", path, *flags])
        return load_config(args.config, _search_overrides(args)).search

    typed = searched("--step", "2", "--val-items", "320", "--budget", "layers", "--finetune-steps", "150")
    assert (typed.step, typed.val_items, typed.budget, typed.finetune_steps) == (2, 320, "layers", 150)
    untouched = searched("--max-drop", "0.1")  # flags not typed leave the config's values in force
    assert (untouched.step, untouched.val_items, untouched.budget, untouched.finetune_steps) == (4, 40, "params", 2)
    assert (untouched.max_drop, untouched.finetune_points) == (0.1, 2)
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "(default 2)" in " ".join(capsys.readouterr().out.split())  # the help still shows the defaults


def test_a_slice_too_small_for_the_tolerance_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "s"
    # 0.01 of 320 items is 3.2 items, fewer than the 5 a tolerated drop must amount to
    assert main(["search", "--model", str(tiny_llama), "--task", "arc_easy", "--out", str(out),
                 "--max-drop", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "too few to measure" in err and "at least 500 items" in err
    assert main(["search", "--model", str(tiny_llama), "--task", "arc_easy", "--out", str(out),
                 "--max-drop", "0.1", "--val-items", "600"]) == 2
    assert "569 held-out items, fewer than the validation slice of 600" in capsys.readouterr().err


def test_next_probe_halves_the_open_range():
    # nothing tried: the phase-1 guess, clipped into the range
    assert next_probe([], [], 7, 1, 15) == 7
    assert next_probe([], [], 40, 1, 15) == 15
    # 7 passed: between 7 and 16 (nothing above 15 may be tried) -> 11; then 11 failed -> 9; 9 passed -> 10
    assert next_probe([7], [], 7, 1, 15) == 11
    assert next_probe([7], [11], 7, 1, 15) == 9
    assert next_probe([7, 9], [11], 7, 1, 15) == 10
    assert next_probe([7, 9, 10], [11], 7, 1, 15) is None
    # 7 failed: between 0 and 7 -> 3
    assert next_probe([], [7], 7, 1, 15) == 3
    assert next_probe([15], [], 15, 1, 15) is None


def _pt(values, loss, **extra):
    return {"task": "t", "metric": "acc", "value": sum(values) / len(values), "higher_is_better": True, "loss": loss,
            "item_scores": {"metric": "acc", "ids": list(range(len(values))), "values": values, "digest": "d"}, **extra}


def test_judge_drop_interval_and_loss_ratio():
    cfg = load_config(None, ["search.max_drop=0.25"])
    ref = _pt([1, 1, 1, 1], 2.0)
    res = judge(_pt([1, 1, 0, 1], 3.0), ref, cfg)
    assert res["drop"] == pytest.approx(0.25) and res["within"]
    assert res["loss_ratio"] == pytest.approx(1.5)
    lo, hi = res["drop_interval"]  # resampling 4 items of differences 0,0,1,0: means from 0 to 1
    assert 0 <= lo <= 0.25 <= hi <= 1
    assert not judge(_pt([1, 0, 0, 1], 3.0), ref, cfg)["within"]
    cfg = load_config(None, ["search.max_loss=1.4"])
    assert not judge(_pt([1, 1, 1, 1], 3.0), ref, cfg)["within"]  # 3.0 / 2.0 = 1.5 > 1.4


def test_budget_units():
    dense = {"k": 0, "params": 100, "latency": {"prefill_s": 2.0, "decode_tokens_per_s": 10.0}}
    point = {"k": 3, "params": 70, "latency": {"prefill_s": 1.5, "decode_tokens_per_s": 12.5}}
    assert budget_value(point, dense, load_config(None, ["search.budget=layers"])) == 3
    assert budget_value(point, dense, load_config(None, ["search.budget=params"])) == pytest.approx(0.3)
    assert budget_value(point, dense, load_config(None, ["search.budget=latency"])) == pytest.approx(0.75)
    assert budget_value(point, dense, load_config(None, ["search.budget=latency", "search.latency=decode"])) \
        == pytest.approx(0.8)


def test_retarget_recomputes_the_guard_without_scoring():
    # 6 layers; the guard (block influence) ranks 5,4,3,2,1,0 cheapest first
    sc = {"method": "igia_guarded", "num_layers": 6, "layer_scores": [0] * 6,
          "layer_scores_by_rule": {"igia": [0.1, 0.5, 0.2, 0.9, 0.3, 0.4]},
          "variant_statistics": {"block_influence": [6, 5, 4, 3, 2, 1], "target": 3}}
    # removing 2: pool 2 + ceil(2/3) = 3 layers {5, 4, 3} keep their IGIA; the others rank above max IGIA + 1 = 1.9
    assert retarget(sc, 2) == [1.9 + 5, 1.9 + 4, 1.9 + 3, 0.9, 0.3, 0.4]
    # removing 1: pool 2 layers {5, 4}
    assert retarget(sc, 1) == [1.9 + 5, 1.9 + 4, 1.9 + 3, 1.9 + 2, 0.3, 0.4]
    assert retarget({"method": "igia", "layer_scores": [3, 1, 2]}, 2) == [3, 1, 2]
    assert retarget({"method": "greedy_loss", "layer_scores": [3, 1, 2]}, 2) is None
    with pytest.raises(GradPrunerError):
        load_config(None, ["search.bogus=1"])


def test_python_api_takes_keywords_and_refuses_bad_ones(tiny_llama, tmp_path):
    import gradpruner
    from gradpruner.pipeline.search import search_config

    cfg = search_config(model=str(tiny_llama), task="arc_easy", out=str(tmp_path / "s"), max_loss=1.1, budget="params")
    assert (cfg.model, cfg.out, cfg.search.max_loss, cfg.search.budget) == (str(tiny_llama), str(tmp_path / "s"), 1.1, "params")
    assert search_config(cfg, step=3).search.max_loss == 1.1 and search_config(cfg, step=3).search.step == 3
    with pytest.raises(GradPrunerError, match="max_dorp"):
        search_config(max_dorp=0.1)
    with pytest.raises(GradPrunerError, match="--max-drop 2.0"):
        gradpruner.search(model=str(tiny_llama), task="arc_easy", out=str(tmp_path / "s"), max_drop=2.0)
    assert not (tmp_path / "s").exists()
