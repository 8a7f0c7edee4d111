"""Run config: YAML + key=value overrides fill the same dataclasses; bad keys and values are named."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpruner.errors import GradPrunerError
from gradpruner.pipeline.config import RunConfig, dump_config, load_config


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(RunConfig()))
    assert load_config(path) == RunConfig()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ntask: piqa\nplan:\n  prune: 5\n  merge: 1\nfinetune:\n  mode: full\n")
    cfg = load_config(path, ["plan.merge=2", "finetune.max_steps=7", "eval.limit=null", "score.lr=3e-4"])
    assert (cfg.model, cfg.task, cfg.plan.prune, cfg.plan.merge) == ("m", "piqa", 5, 2)
    assert (cfg.finetune.mode, cfg.finetune.max_steps, cfg.eval.limit, cfg.score.lr) == ("full", 7, None, 3e-4)
    assert cfg.score.steps == 40  # untouched keys keep their defaults


def test_unknown_keys_get_did_you_mean_and_all_are_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle: m\nscore:\n  step: 3\n")
    with pytest.raises(GradPrunerError) as exc:
        load_config(path, ["finetun.mode=lora"])
    msg = str(exc.value)
    assert "'modle'" in msg and "'model'" in msg and "'score.step'" in msg and "'steps'" in msg and "'finetune'" in msg


@pytest.mark.parametrize("override,needle", [
    ("score.steps=abc", "score.steps"), ("plan.merge=true", "plan.merge"), ("finetune.mode=lra", "finetune.mode"),
    ("task=null", "task and data"), ("plan.target_params=0.4", "exactly one of plan.prune, plan.target_params"),
    ("out=../../etc", "climbs out"), ("seed", "key=value"), ("score=3", "mapping"),
])
def test_bad_values_are_named(override, needle):
    with pytest.raises(GradPrunerError, match=None) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(GradPrunerError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(GradPrunerError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(GradPrunerError, match="mapping"):
        load_config(listy)


json_like = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                         max_leaves=12)
keys = st.sampled_from(["model", "task", "data", "seed", "out", "score", "plan", "score.steps", "plan.prune",
                        "finetune.mode", "eval.limit", "prune.density", "nonsense", "score.nope"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, json_like, max_size=5))
def test_any_yaml_content_either_loads_or_raises_a_user_error(tmp_path_factory, data):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(path)
    except GradPrunerError:
        return
    assert isinstance(cfg, RunConfig)


def test_a_saved_config_of_an_earlier_version_still_runs(tmp_path):
    """finetune.bf16 moved to runtime.dtype: the null every earlier config.yaml saved is read as before;
    a value that asked for something is refused with where the setting lives now."""
    old = tmp_path / "config.yaml"
    old.write_text("finetune:\n  bf16: null\n  max_steps: 5\n")
    assert load_config(old).finetune.max_steps == 5
    with pytest.raises(GradPrunerError, match="finetune.bf16 is no longer read; set runtime.dtype"):
        load_config(old, ["finetune.bf16=true"])
