"""experiments/holding_accuracy/diagnose_igia.py's pure helpers on hand-made numbers; no model."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("diagnose_igia", Path(__file__).parents[1] / "experiments" / "holding_accuracy" / "diagnose_igia.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)


def test_concentration_shares():
    scores = {"model.layers.0.mlp.down_proj": 8.0, "model.layers.0.self_attn.q_proj": 1.0,
              "model.layers.1.self_attn.v_proj": 1.0}
    c = diag.concentration(scores, {k: int(k.split(".")[2]) for k in scores}, 2)
    assert c["largest_share"] == pytest.approx(0.8)
    assert c["top10"][0]["module"] == "model.layers.0.mlp.down_proj"
    assert c["type_share"]["down"] == pytest.approx(0.8) and c["type_share"]["v"] == pytest.approx(0.1)
    assert np.array(c["grid"])[diag.TYPES.index("v"), 1] == 1.0


def test_fit_recovers_power_law():
    x = np.geomspace(1e-3, 1e-1, 10)
    fit = diag.fit_loglog(x, 3.0 * x ** 4)
    assert fit["b"] == pytest.approx(4.0) and fit["r2"] == pytest.approx(1.0)


def test_step_profile_marks_zero_step():
    st = diag.step_profile([[0, 0], [1, 1], [6, 2]], [3.0, 2.0, 1.0])
    assert st["zero_steps"] == [1] and st["top_step"] == 3 and st["top_step_share"] == pytest.approx(0.8)


def test_agreement_and_duplicate_methods(tmp_path):
    for key, method, scores in (("aaaaaa1", "laco", [3, 2, 1, 0]), ("bbbbbb2", "laco", [0, 1, 2, 3]),
                                ("cccccc3", "igia", [9, 9, 9, 9]), ("dddddd4", "taylor", [1, 0, 3, 2])):
        (tmp_path / f"score-{key}" / "scores").mkdir(parents=True)
        (tmp_path / f"score-{key}" / "scores" / "scores.json").write_text(
            json.dumps({"method": method, "task": "t", "layer_scores": scores}))
    others = diag.other_methods(tmp_path, "t")
    assert set(others) == {"laco@aaaaaa", "laco@bbbbbb", "taylor"}
    stats, plans = diag.agreement([0, 1, 2, 3], others, 2)
    assert plans["igia"] == {0, 1}
    assert stats["laco@bbbbbb"] == {"spearman": pytest.approx(1.0), "overlap": 2}
    assert stats["laco@aaaaaa"]["spearman"] == pytest.approx(-1.0) and stats["laco@aaaaaa"]["overlap"] == 0
