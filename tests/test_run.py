"""`gradpruner run` end to end on a tiny model: every stage, the report, caching and resuming."""
import json

import pytest
import yaml

from gradpruner.cli import main
from gradpruner.pipeline.config import load_config
from gradpruner.pipeline.run import run


def _config(tmp_path, model, **extra) -> dict:
    cfg = {
        "model": str(model), "task": "arc_easy", "out": str(tmp_path / "run"), "seed": 0,
        "score": {"steps": 3, "batch_size": 4, "max_length": 96, "lr": 1e-3},
        "plan": {"prune": 3, "merge": 1},
        "finetune": {"mode": "lora", "max_steps": 3, "batch_size": 4, "max_length": 96, "limit": 64},
        "eval": {"limit": 6, "batch_size": 6},
    }
    cfg.update(extra)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stages_run(log):
    return [line.split("→ ")[1] for line in log if "→ " in line]


def test_run_end_to_end_then_cached_then_partial_rerun(tiny_llama, tmp_path, one_thread):
    path = _config(tmp_path, tiny_llama)
    log: list[str] = []
    report = run(load_config(path), echo=log.append, isolate=False)
    d = tmp_path / "run"
    assert _stages_run(log) == ["dense_ft", "score", "plan", "prune", "pruned_ft", "eval_dense_zero_shot",
                                "eval_dense_ft", "eval_pruned", "eval_pruned_ft"]
    for name in ("dense_zero_shot", "dense_ft", "pruned", "pruned_ft"):
        e = json.loads((d / "eval" / f"{name}.json").read_text())
        assert e["task"] == "arc_easy" and e["n"] == 6 and e["metric"] == "acc" and 0 <= e["value"] <= 1
    pr = json.loads((d / "eval" / "pruned_ft.json").read_text())
    de = json.loads((d / "eval" / "dense_ft.json").read_text())
    assert pr["params"]["num_layers"] == 5 and pr["flops_per_token"]["flops"] < de["flops_per_token"]["flops"]
    text = report.read_text()
    for needle in ("GradPruner (pruned + fine-tuned)", "dense, fine-tuned", "Cost of every stage", "GradPruner path",
                   "![igia_guarded layer scores](layer_scores.png)", "block influence ranks lowest", "merge: 1"):
        assert needle in text
    html = (d / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    card = (d / "pruned_ft" / "README.md").read_text()  # the model card carries the run's measured results
    assert "## Measured results" in card and f"| {pr['value']:.4f} | 6 |" in card and "**Pruned**: 3 of 8" in card
    stage = json.loads((d / "stages" / "pruned_ft.json").read_text())
    assert stage["usage"]["seconds"] > 0 and stage["usage"]["peak_rss_mb"] > 0

    log.clear()
    run(load_config(path), echo=log.append, isolate=False)
    assert _stages_run(log) == []  # everything up to date

    log.clear()
    run(load_config(path, ["plan.merge=0"]), echo=log.append, isolate=False)
    assert _stages_run(log) == ["plan", "prune", "pruned_ft", "eval_pruned", "eval_pruned_ft"]
    assert json.loads((d / "plan.json").read_text())["merge"] == {}


def test_needed_stages_follow_unfinished_evaluations_upstream():
    from gradpruner.pipeline.run import needed_stages

    reads = {"dense_ft": (), "score": (), "plan": ("score",), "prune": ("plan",), "pruned_ft": ("prune", "dense_ft"),
             "eval_dense_ft": ("dense_ft",), "eval_pruned_ft": ("pruned_ft",), "eval_pruned": ("prune",)}
    assert needed_stages(reads, lambda s: True) == set()
    assert needed_stages(reads, lambda s: s != "eval_dense_ft") == {"eval_dense_ft", "dense_ft"}
    assert needed_stages(reads, lambda s: s != "eval_pruned") == {"eval_pruned", "prune", "plan", "score"}
    assert needed_stages(reads, lambda s: s != "eval_pruned_ft") == {"eval_pruned_ft", "pruned_ft", "prune", "plan",
                                                                     "score", "dense_ft"}
    assert needed_stages(reads, lambda s: True, ("prune",)) == {"prune", "plan", "score"}  # asked for its output


def test_results_without_checkpoints_are_not_recomputed(tiny_llama, tmp_path, one_thread):
    """Committed results keep evaluations and records but not the models: a run over them must not
    fine-tune again what it has already evaluated, and an evaluation still missing rebuilds only its chain."""
    import shutil

    path = _config(tmp_path, tiny_llama)
    run(load_config(path), echo=lambda s: None, isolate=False)
    d = tmp_path / "run"
    for folder in ("dense_ft", "pruned", "pruned_ft"):
        shutil.rmtree(d / folder)
    log: list[str] = []
    report = run(load_config(path), echo=log.append, isolate=False)
    assert _stages_run(log) == [] and report.is_file()
    assert any("pruned_ft: not needed" in line for line in log) and not (d / "pruned_ft").exists()

    (d / "eval" / "pruned_ft.json").unlink()
    log.clear()
    run(load_config(path), echo=log.append, isolate=False)
    assert _stages_run(log) == ["prune", "pruned_ft", "eval_pruned_ft"]  # dense fine-tune not rebuilt
    assert "## Measured results" in (d / "pruned_ft" / "README.md").read_text()

    # the IGIA factors are not committed either: a merge that needs them scores again, the rest is kept
    (d / "scores" / "igia.safetensors").unlink()
    for folder in ("pruned", "pruned_ft"):
        shutil.rmtree(d / folder)
    (d / "eval" / "pruned_ft.json").unlink()
    log.clear()
    run(load_config(path), echo=log.append, isolate=False)
    assert _stages_run(log) == ["score", "prune", "pruned_ft", "eval_pruned_ft"]
    assert (d / "scores" / "igia.safetensors").is_file()


def test_interrupted_run_resumes_where_it_stopped(tiny_llama, tmp_path, monkeypatch, one_thread):
    from gradpruner.pipeline import run as pipeline

    path = _config(tmp_path, tiny_llama, finetune={"mode": "lora", "max_steps": 2, "batch_size": 4,
                                                  "max_length": 96, "limit": 32, "dense_baseline": False})
    real = pipeline._prune

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_prune", crash)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(path), echo=lambda s: None, isolate=False)
    assert not (tmp_path / "run" / "pruned").exists()
    monkeypatch.setattr(pipeline, "_prune", real)
    log: list[str] = []
    run(load_config(path), echo=log.append, isolate=False)
    assert _stages_run(log)[:2] == ["prune", "pruned_ft"] and "score" not in _stages_run(log)


def test_cli_run_with_overrides_and_bad_key(tiny_llama, tmp_path, capsys, one_thread):
    path = _config(tmp_path, tiny_llama, finetune={"mode": "lora", "max_steps": 2, "batch_size": 4,
                                                  "max_length": 96, "limit": 32, "dense_baseline": False})
    assert main(["run", str(path), "eval.zero_shot_dense=false", "eval.pruned_no_finetune=false"]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "eval").iterdir()) == ["pruned_ft.json"]
    assert main(["run", str(path), "plan.merj=1"]) == 2
    err = capsys.readouterr().err
    assert "'plan.merj'" in err and "Did you mean 'merge'" in err


def test_data_runs_need_a_disjoint_eval_file(tiny_llama, qa_file, tmp_path, capsys):
    path = _config(tmp_path, tiny_llama, task=None, data=str(qa_file))
    assert main(["run", str(path)]) == 2
    assert "eval_data" in capsys.readouterr().err
    assert main(["run", str(path), f"eval_data={qa_file}"]) == 2
    assert "overlap" in capsys.readouterr().err.lower()


def test_demo_config_file_matches_the_demo():
    from gradpruner.pipeline.demo import demo_config

    assert load_config("configs/demo.yaml") == demo_config("runs/demo")


def test_run_with_a_greedy_block_search(tiny_llama, tmp_path, one_thread):
    path = _config(tmp_path, tiny_llama, score={"method": "igia_greedy", "greedy_unit": "block", "steps": 3,
                                                "batch_size": 4, "max_length": 96, "lr": 1e-3, "calib_examples": 8},
                   plan={"prune": 2, "merge": 0, "granularity": "block"})
    report = run(load_config(path), echo=lambda s: None, isolate=False)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["granularity"] == "block" and len(plan["removed_blocks"]) == 4 and len(plan["keep"]) == 6
    pr = json.loads((tmp_path / "run" / "eval" / "pruned_ft.json").read_text())
    assert pr["params"]["num_layers"] == 6
    assert "Greedy removal of attention/MLP block pairs" in report.read_text()


def _children(pid: int) -> list[int]:
    from pathlib import Path

    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid and not fields.get("State", "").strip().startswith("Z"):
            kids.append(int(status.parent.name))
    return kids


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_sigterm_to_a_run_stops_its_stage_process_too(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = ("import time; from pathlib import Path; from gradpruner.pipeline.isolate import in_child; "
              f"in_child(time.sleep, (120,), {{}}, Path({str(tmp_path / 'r.json')!r}))")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not _children(parent.pid):
        time.sleep(0.2)
    kids = _children(parent.pid)
    assert kids, "the stage process never started"
    time.sleep(1)  # let the parent reach its join
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) != 0
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.2)
    assert not any(_alive(k) for k in kids), "the stage process outlived its run"


def _alive(pid: int) -> bool:
    """A live (not zombie) process ``pid``."""
    from pathlib import Path

    try:
        return not Path(f"/proc/{pid}/status").read_text().split("State:")[1].strip().startswith("Z")
    except (OSError, IndexError):
        return False
