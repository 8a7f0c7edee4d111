"""Gradient sensitivity analysis (Fig. 2) on hand-made step tables; no models."""
import json
import math

import pytest

from gradpruner.errors import GradPrunerError
from gradpruner.scoring.sensitivity import (
    agreement_curve,
    cumulative_scores,
    first_stable_step,
    format_curve,
    select,
    sensitivity,
    spearman,
)

# 3 steps, 5 layers. Step 1 is zero (LoRA B starts at 0).
STEPS = [[0, 0, 0, 0, 0],
         [4, 1, 3, 2, 5],
         [2, 5, 0, 6, 1]]
# Cumulative means: s1 all 0; s2 [2, .5, 1.5, 1, 2.5]; s3 [2, 2, 1, 8/3, 2].


def _write(path, steps, **extra):
    data = {"method": "igia", "num_layers": len(steps[0]), "steps": len(steps), "step_layer_sq_norms": steps,
            "layer_scores": cumulative_scores(steps)[-1], **extra}
    path.write_text(json.dumps(data))
    return path


def test_cumulative_mean():
    cum = cumulative_scores(STEPS)
    assert cum[0] == [0, 0, 0, 0, 0]
    assert cum[1] == [2.0, 0.5, 1.5, 1.0, 2.5]
    assert cum[2] == pytest.approx([2.0, 2.0, 1.0, 8 / 3, 2.0])
    assert cumulative_scores([]) == []


def test_select_ties_lower_index_first():
    assert select([0, 0, 0, 0], 2, "bottom") == {0, 1}
    assert select([0, 0, 0, 0], 2, "top") == {0, 1}
    assert select([2, 2, 1, 3, 2], 2, "bottom") == {2, 0}
    assert select([2, 2, 1, 3, 2], 2, "top") == {3, 0}
    with pytest.raises(GradPrunerError):
        select([1, 2], 1, "middle")


def test_overlap_curve_by_hand_bottom():
    # reference (s3) bottom-2: layer 2 (1.0), then the tie at 2.0 -> layer 0   => {0, 2}
    # s1: all zero -> {0, 1}: overlap 1/2;  s2: {1 (0.5), 3 (1.0)}: overlap 0;  s3: 1
    curve = agreement_curve(STEPS, 2)
    assert curve["steps"] == [1, 2, 3]
    assert curve["overlap"] == [0.5, 0.0, 1.0]
    assert curve["reference_selection"] == [0, 2]
    assert curve["reference_steps"] == 3 and curve["k"] == 2 and curve["which"] == "bottom"
    # Spearman: s1 constant -> None. s2 ranks [4,1,3,2,5] vs ref ranks [3,3,1,5,3]:
    # d = [1,-2,0,-1,2], e = [0,0,-2,2,0]; rho = -2 / sqrt(10 * 8)
    assert curve["spearman"][0] is None
    assert curve["spearman"][1] == pytest.approx(-2 / math.sqrt(80))
    assert curve["spearman"][2] == pytest.approx(1.0)
    assert first_stable_step(curve) == 3


def test_overlap_curve_by_hand_top():
    # reference top-2: layer 3 (8/3), then layer 0 (2.0, lowest index of the tie) => {0, 3}
    # s1 {0, 1}: 1/2;  s2 {4 (2.5), 0 (2.0)}: 1/2;  s3: 1
    curve = agreement_curve(STEPS, 2, which="top")
    assert curve["overlap"] == [0.5, 0.5, 1.0]
    assert first_stable_step(curve) == 3
    assert first_stable_step(curve, threshold=0.5) == 1


def test_first_stable_step_needs_all_later_steps():
    assert first_stable_step({"steps": [1, 2, 3, 4], "overlap": [1.0, 0.5, 1.0, 1.0]}) == 3
    assert first_stable_step({"steps": [1, 2, 3], "overlap": [1.0, 1.0, 0.5]}) is None


def test_spearman_matches_scipy_or_hand():
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    y = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0]
    stats = pytest.importorskip("scipy.stats")
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    for s in cumulative_scores(STEPS)[1:]:
        assert spearman(s, cumulative_scores(STEPS)[-1]) == pytest.approx(
            stats.spearmanr(s, cumulative_scores(STEPS)[-1]).statistic)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_reference_from_another_file(tmp_path):
    short = _write(tmp_path / "short.json", STEPS[:2])
    long_ = _write(tmp_path / "long.json", STEPS)
    out = sensitivity(short, 2, reference_path=long_)
    # Against the long run's final scores (bottom-2 = {0, 2}): s1 {0,1} -> 0.5, s2 {1,3} -> 0
    assert out["overlap"] == [0.5, 0.0]
    assert out["reference_steps"] == 3
    assert out["first_stable_step"] is None
    assert out["reference"] == str(long_) and out["rule"] == "igia" and out["num_layers"] == 5
    # A reference without the step table falls back to its layer_scores.
    only_scores = tmp_path / "only.json"
    only_scores.write_text(json.dumps({"layer_scores": [2, 2, 1, 3, 2], "steps": 100}))
    out = sensitivity(short, 2, reference_path=only_scores)
    assert out["overlap"] == [0.5, 0.0] and out["reference_steps"] == 100
    # A list passed directly works the same way.
    assert agreement_curve(STEPS[:2], 2, reference=[2, 2, 1, 3, 2])["overlap"] == [0.5, 0.0]


@pytest.mark.parametrize("bad", [
    {"num_layers": 5, "steps": 3},                                                    # missing key
    {"num_layers": 5, "step_layer_sq_norms": []},                                     # empty
    {"num_layers": 5, "step_layer_sq_norms": [[0, 0, 0, 0, 0], [1, 2, 3]]},           # ragged
    {"num_layers": 5, "step_layer_sq_norms": [[0, 0, 0, 0, 0], [1, 2, float("nan"), 4, 5]]},
    {"num_layers": 5, "step_layer_sq_norms": [[0, 0, 0, 0, 0], [1, 2, float("inf"), 4, 5]]},
    {"num_layers": 5, "step_layer_sq_norms": [[0, 0, 0, 0, 0], [1, 2, -3, 4, 5]]},
    {"num_layers": 5, "step_layer_sq_norms": [[0, 0, 0, 0, 0], [1, 2, "x", 4, 5]]},
])
def test_bad_scores_file(tmp_path, bad):
    p = tmp_path / "scores.json"
    p.write_text(json.dumps(bad))  # json.dumps writes NaN/Infinity, which json.loads reads back
    with pytest.raises(GradPrunerError, match="scores.json"):
        sensitivity(p, 2)


@pytest.mark.parametrize("k", [0, 5, 6, -1, 2.5, True])
def test_k_out_of_range(tmp_path, k):
    p = _write(tmp_path / "scores.json", STEPS)
    with pytest.raises(GradPrunerError, match="k="):
        sensitivity(p, k)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(GradPrunerError, match="does not exist"):
        sensitivity(tmp_path / "nope.json", 2)
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(GradPrunerError, match="not valid JSON"):
        sensitivity(p, 2)


def test_mismatched_layer_count(tmp_path):
    p = _write(tmp_path / "scores.json", STEPS)
    other = _write(tmp_path / "other.json", [[0, 0, 0], [1, 2, 3]])
    with pytest.raises(GradPrunerError, match="other.json.*3 layers"):
        sensitivity(p, 2, reference_path=other)
    with pytest.raises(GradPrunerError):
        agreement_curve(STEPS, 2, reference=[1.0, 2.0])
    bad_ref = tmp_path / "bad_ref.json"
    bad_ref.write_text(json.dumps({"layer_scores": [1, None, 2, 3, 4]}))
    with pytest.raises(GradPrunerError, match="bad_ref.json"):
        sensitivity(p, 2, reference_path=bad_ref)


def test_out_dir_writes_json_and_png(tmp_path):
    p = _write(tmp_path / "scores.json", STEPS)
    out = sensitivity(p, 2, out_dir=tmp_path / "sens")
    saved = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert saved["overlap"] == [0.5, 0.0, 1.0]
    assert saved["spearman"][0] is None
    assert saved["first_stable_step"] == out["first_stable_step"] == 3
    png = (tmp_path / "sens" / "sensitivity.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_format_curve_thins_rows():
    steps = [[0.0] * 4] + [[float(i), 2.0, 3.0, 4.0 - i % 2] for i in range(1, 50)]
    text = format_curve(agreement_curve(steps, 1))
    rows = text.splitlines()
    assert len(rows) <= 22  # header + ≤ 20 steps + stable line
    assert rows[1].split()[0] == "1" and rows[-2].split()[0] == "50"
    assert "stable from step" in rows[-1]
    short = format_curve(agreement_curve(STEPS, 2))
    assert len(short.splitlines()) == 5 and short.splitlines()[1].split()[-1] == "-"
