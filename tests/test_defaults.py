"""Every default is written once: the CLI, the YAML file and the Python API give the same settings."""
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from gradpruner import api
from gradpruner.cli import build_parser
from gradpruner.evaluation.config import EvalConfig
from gradpruner.evaluation.evaluate import evaluate
from gradpruner.finetuning.config import FinetuneConfig
from gradpruner.finetuning.finetune import finetune
from gradpruner.healing.config import HealConfig
from gradpruner.pipeline.config import RunConfig, load_config
from gradpruner.pipeline.demo import demo_config
from gradpruner.planning.config import PlanConfig
from gradpruner.pruning.config import PruneConfig
from gradpruner.scoring.config import ScoreConfig
from gradpruner.util.options import cli_fields, defaults, flag_name

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {  # the required arguments of each command, nothing else
    "score": (ScoreConfig, ["--model", "m", "--task", "arc_easy", "--out", "o"]),
    "plan": (PlanConfig, ["--scores", "s.json", "--out", "o"]),
    "prune": (PruneConfig, ["--model", "m", "--plan", "p.json", "--out", "o"]),
    "heal": (HealConfig, ["--model", "m", "--pruned", "p", "--plan", "p.json", "--task", "arc_easy", "--out", "o"]),
    "finetune": (FinetuneConfig, ["--model", "m", "--task", "arc_easy", "--out", "o"]),
    "eval": (EvalConfig, ["--model", "m", "--task", "arc_easy"]),
}
API = {ScoreConfig: api.score, PlanConfig: api.plan, PruneConfig: api.prune, HealConfig: api.heal,
       FinetuneConfig: finetune, EvalConfig: evaluate}


@pytest.mark.parametrize("command", MINIMAL)
def test_cli_defaults_are_the_config_defaults(command):
    cls, argv = MINIMAL[command]
    args = build_parser().parse_args([command, *argv])
    expected = defaults(cls)
    for f in cli_fields(cls):
        got = getattr(args, f.name)
        if command == "plan" and f.name == "prune":
            assert got is None  # left to the API, which applies PlanConfig's default unless target_params is given
            continue
        assert got == expected[f.name], f"gradpruner {command} {flag_name(f)} defaults to {got!r}, the config to {expected[f.name]!r}"


@pytest.mark.parametrize("cls", list(API), ids=lambda c: c.__name__)
def test_api_takes_the_config_and_repeats_none_of_its_fields(cls):
    params = inspect.signature(API[cls]).parameters
    assert "config" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    repeated = {f.name for f in dataclasses.fields(cls)} & set(params)
    assert not repeated, f"{API[cls].__name__} repeats config fields {repeated}; their defaults would be written twice"


def test_api_rejects_unknown_setting_with_a_suggestion(tmp_path):
    from gradpruner.errors import GradPrunerError

    with pytest.raises(GradPrunerError, match="did you mean 'merge'"):
        api.plan(tmp_path / "scores.json", tmp_path / "plan.json", merg=3)


def test_run_sections_are_the_stage_configs():
    cfg = RunConfig()
    assert isinstance(cfg.score, ScoreConfig) and isinstance(cfg.plan, PlanConfig)
    assert isinstance(cfg.prune, PruneConfig) and isinstance(cfg.finetune, FinetuneConfig)
    assert isinstance(cfg.eval, EvalConfig) and isinstance(cfg.heal, HealConfig)
    assert load_config(None) == cfg  # an empty YAML file gives the same defaults


def test_one_default_method_and_merge_count_everywhere():
    method, merge = ScoreConfig().method, PlanConfig().merge
    assert (method, merge) == ("igia_guarded", 0)  # the configuration whose numbers the README reports
    assert (RunConfig().score.method, RunConfig().plan.merge) == (method, merge)
    demo = demo_config()
    assert (demo.score.method, demo.plan.merge) == (method, merge)
    assert load_config(ROOT / "configs" / "demo.yaml") == demo
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"default[^.\n]*`{method}`|`{method}`[^.\n]*default", readme), "the README must name the default method"


def test_prune_heal_defaults_to_the_heal_config():
    args = build_parser().parse_args(["prune", *MINIMAL["prune"][1]])
    assert args.heal == HealConfig().rule == "none"


def test_every_flag_is_documented():
    text = (ROOT / "docs" / "commands.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {opt}" for name, p in sub.choices.items() for a in p._actions for opt in a.option_strings
               if opt.startswith("--") and opt not in ("--help",) and opt not in text]
    assert not missing, f"flags missing from docs/commands.md: {missing}"


def test_every_run_config_key_is_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    cfg = RunConfig().to_dict()
    keys = [f"{k}.{sub}" if isinstance(v, dict) else k for k, v in cfg.items() for sub in (v if isinstance(v, dict) else [None])]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"config keys missing from docs/config.md: {missing}"
