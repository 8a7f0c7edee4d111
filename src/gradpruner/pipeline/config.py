"""The run configuration: one YAML file, overridable by ``key=value`` arguments.

Every key is a dataclass field with a default and a comment; the YAML and the CLI overrides fill the
same objects, unknown keys get a did-you-mean error, and the resolved config is written next to the
run's outputs. Documented key by key in docs/config.md.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from gradpruner.errors import GradPrunerError
from gradpruner.evaluation.config import EvalConfig
from gradpruner.finetuning.config import MODES, FinetuneConfig
from gradpruner.healing.config import HealConfig, config_problems
from gradpruner.models.runtime import RuntimeConfig
from gradpruner.planning.config import PlanConfig
from gradpruner.pruning.config import PruneConfig
from gradpruner.scoring.config import ScoreConfig
from gradpruner.util.options import opt


@dataclass
class FinetuneStageConfig(FinetuneConfig):
    """The run's fine-tune section: the fine-tune stage's settings and which models the run trains."""

    dense_baseline: bool = opt(True, "also fine-tune the dense model the same way")
    distill: str | None = opt(None, "pruned fine-tune only: null, dense_ft or dense, the teacher whose logits join the loss")


@dataclass
class EvalStageConfig(EvalConfig):
    """The run's eval section: the evaluate stage's settings and which models the run evaluates."""

    zero_shot_dense: bool = opt(True, "also evaluate the dense model before fine-tuning")
    pruned_no_finetune: bool = opt(True, "also evaluate the pruned model before fine-tuning")


BUDGETS = ("layers", "params", "latency")


@dataclass
class SearchConfig:
    """``gradpruner search``: the largest removal whose validation metric (or held-out loss) stays within a
    tolerance of the dense model's, both fine-tuned alike."""

    max_drop: float | None = opt(None, "largest accepted drop of the task metric on the validation slice, absolute "
                                 "(e.g. 0.02); or give max_loss")
    max_loss: float | None = opt(None, "largest accepted ratio of held-out loss to the dense model's (e.g. 1.05); "
                                 "or give max_drop")
    budget: str = opt("layers", "what the curve and the answer count: layers, params (fraction of parameters removed) "
                      "or latency (measured ratio to the dense model)")
    latency: str = opt("prefill", "with budget latency: prefill or decode, measured as gradpruner bench does")
    val_items: int = opt(320, "validation slice: the last N held-out items (the items before them stay for testing)")
    min_prune: int = opt(1, "fewest layers to consider removing")
    max_prune: int | None = opt(None, "most layers to consider removing (empty: half of them)")
    step: int = opt(2, "layers between two points of the curve before fine-tuning")
    finetune_points: int = opt(3, "most removals fine-tuned (each costs one fine-tune of a pruned model)")
    finetune_steps: int | None = opt(150, "optimizer steps of each fine-tune, the dense reference's included "
                                     "(empty: the run's finetune section)")
    store: str | None = opt(None, "folder of finished points, shared by searches (empty: OUT/store)")


@dataclass
class RunConfig:
    model: str = "smollm2-135m"  # local folder, .gguf, alias or Hub id
    task: str | None = "arc_easy"  # built-in task, or None with data
    data: str | None = None      # JSONL of prompt/completion lines (instead of task)
    eval_data: str | None = None  # held-out JSONL to evaluate on (required with data; must not overlap it)
    data_dir: str | None = None  # task data folder, or hub (default: $GRADPRUNER_DATA_DIR, else the data shipped in the package)
    out: str = "runs/run"        # run folder: every stage writes here
    seed: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # device, dtype, … of every stage
    score: ScoreConfig = field(default_factory=ScoreConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    heal: HealConfig = field(default_factory=HealConfig)  # rule none: no heal stage
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # read by gradpruner search only

    def to_dict(self) -> dict:
        return {f.name: section_dict(v) if dataclasses.is_dataclass(v := getattr(self, f.name)) else v
                for f in fields(self)}


def section_dict(obj) -> dict:
    """A config section as the YAML holds it: without the fields the run sets itself (``run=False``)."""
    if isinstance(obj, dict):
        return obj
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.metadata.get("run", True)}


def _known(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def _unknown_key(key: str, known, where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown config key {where + key!r}; valid keys there: {', '.join(sorted(known))}.{hint}"


def _coerce(value, f: dataclasses.Field, where: str):
    """Check a YAML value against the field's type; ints are accepted for floats."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind:
            return None
        raise GradPrunerError(f"Config key {where}{f.name} cannot be empty; give a {kind} value.")
    if isinstance(value, bool) and not kind.startswith("bool"):
        raise GradPrunerError(f"Config key {where}{f.name} is {value!r}; expected {kind}.")
    for name, typ in (("int", int), ("float", float), ("str", str), ("bool", bool)):
        if kind.startswith(name):
            if typ is float and isinstance(value, int):
                return float(value)
            if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            if not isinstance(value, typ):
                raise GradPrunerError(f"Config key {where}{f.name} is {value!r}; expected {kind}.")
            return value
    return value


RENAMED = {"plan.rule": "from_method"}  # keys of earlier versions, so their config.yaml files still run
# Keys of earlier versions whose setting moved elsewhere: their default (null) is read as before, any
# other value is refused with where the setting lives now.
RETIRED = {"finetune.bf16": "runtime.dtype (bfloat16 autocast: runtime.dtype: bfloat16; null was auto, now runtime.dtype: auto)"}


def _build(cls, data: dict, where: str = "", problems: list | None = None):
    known = _known(cls)
    kwargs = {}
    for key, value in data.items():
        key = RENAMED.get(where + str(key), key)
        if where + str(key) in RETIRED:
            if value is not None:
                problems.append(f"Config key {where}{key} is no longer read; set {RETIRED[where + str(key)]}.")
            continue
        if key not in known or not known[key].metadata.get("run", True):
            problems.append(_unknown_key(str(key), {k: f for k, f in known.items() if f.metadata.get("run", True)}, where))
            continue
        f = known[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            sub = f.default_factory
            if not isinstance(value, dict):
                problems.append(f"Config key {where}{key} must be a mapping of its own keys.")
                continue
            kwargs[key] = _build(sub, value, f"{where}{key}.", problems)
            continue
        try:
            kwargs[key] = _coerce(value, f, where)
        except GradPrunerError as exc:
            problems.extend(exc.problems)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """``finetune.max_steps=100`` -> (["finetune", "max_steps"], 100), the value parsed as YAML."""
    if "=" not in text:
        raise GradPrunerError(f"Override {text!r} is not key=value; write e.g. finetune.max_steps=100.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def read_yaml_mapping(path: str | Path, what: str = "Config file") -> dict:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise GradPrunerError(f"{what} {path} does not exist; check the path (examples are in configs/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise GradPrunerError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file.") from None
    if not isinstance(data, dict):
        raise GradPrunerError(f"{what} {path} must hold a mapping of keys, not a {type(data).__name__}.")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(data, overrides)


def config_from_dict(data: dict, overrides: list[str] = ()) -> RunConfig:
    """Validate a config mapping (as read from YAML) after applying ``key=value`` overrides."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise GradPrunerError(f"Override {text!r}: {k} is not a section; check the key.")
        node[keys[-1]] = value
    problems: list[str] = []
    cfg = _build(RunConfig, data, "", problems)
    problems += _check(cfg)
    if problems:
        raise GradPrunerError(*problems)
    return cfg


def _check(cfg: RunConfig) -> list[str]:
    """Cross-key rules that single values cannot express."""
    out = []
    if (cfg.task is None) == (cfg.data is None):
        out.append("Give exactly one of the config keys task and data (set the other to null).")
    if cfg.data is not None and cfg.eval_data is None:
        out.append("With data, give eval_data too: a held-out JSONL that shares no example with data.")
    targets = [cfg.plan.prune, cfg.plan.target_params, cfg.plan.target_latency, cfg.plan.target_memory]
    if sum(t is not None for t in targets) != 1:
        out.append("Give exactly one of plan.prune, plan.target_params, plan.target_latency and plan.target_memory "
                   "(set the others to null).")
    if cfg.finetune.distill not in (None, "dense_ft", "dense"):
        out.append(f"finetune.distill is {cfg.finetune.distill!r}; use null, dense_ft (the dense fine-tuned model) or dense.")
    elif cfg.finetune.distill == "dense_ft" and not cfg.finetune.dense_baseline:
        out.append("finetune.distill dense_ft needs finetune.dense_baseline: true (the teacher is that model).")
    if cfg.finetune.mode not in MODES:
        out.append(f"finetune.mode is {cfg.finetune.mode!r}; use {', '.join(MODES)}.")
    out += _check_methods(cfg)
    out += _check_runtime(cfg)
    for key in ("model", "data", "eval_data", "data_dir", "out", "eval.encoder"):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, str) and not value.isprintable():
            out.append(f"Config key {key} {value!r} contains control characters (NUL, tab, newline); give a plain path.")
    if not str(cfg.out).strip():
        out.append("Config key out is empty; give the run folder, e.g. runs/my_run.")
    elif ".." in Path(cfg.out).parts:
        out.append(f"Config key out {cfg.out!r} climbs out of the working folder with '..'; give a plain path.")
    return out


def _check_methods(cfg: RunConfig) -> list[str]:
    """Registry names, and merges only where the scoring method provides what the merge rule needs."""
    from gradpruner.errors import lookup
    from gradpruner.pruning.merging import MERGE_RULES, needs_igia
    from gradpruner.scoring.greedy import POOLS
    from gradpruner.scoring.methods import METHODS
    from gradpruner.scoring.variants import needs_target

    try:
        method = lookup(METHODS, cfg.score.method, "scoring method (score.method)")
        rule = lookup(MERGE_RULES, cfg.prune.merge_rule, "merge rule (prune.merge_rule)") and cfg.prune.merge_rule
    except GradPrunerError as exc:
        return list(exc.problems)
    out = []
    if cfg.plan.merge and needs_igia(rule) and not method.factors:
        out.append(f"plan.merge is {cfg.plan.merge} but score.method {cfg.score.method} writes no IGIA factors, "
                   f"which prune.merge_rule {rule} needs; set plan.merge: 0, or a merge rule without IGIA "
                   "(ties, laco, none), or score.method: igia.")
    if cfg.plan.from_method is not None and cfg.plan.from_method != cfg.score.method and not (
            method.factors and cfg.plan.from_method in ("igia", "igia_norm")):
        out.append(f"plan.from_method {cfg.plan.from_method!r} does not fit score.method {cfg.score.method}; leave plan.from_method null "
                   "(the method's own scores) or, for IGIA scores, use igia or igia_norm.")
    if cfg.score.method == "laco" and cfg.plan.prune is None:
        out.append("score.method laco needs plan.prune (the number of layers to collapse), not plan.target_params.")
    if needs_target(cfg.score.method) and cfg.plan.prune is None:
        out.append(f"score.method {cfg.score.method} needs plan.prune (its pool or its stop is sized from it), not plan.target_params.")
    if cfg.score.greedy_pool not in POOLS:
        out.append(f"score.greedy_pool is {cfg.score.greedy_pool!r}; use {' or '.join(POOLS)} (IGIA's pool: score.method igia_greedy).")
    if cfg.plan.granularity not in ("layer", "hidden", "block"):
        out.append(f"plan.granularity is {cfg.plan.granularity!r}; use layer, hidden or block.")
    elif cfg.plan.granularity == "hidden" and not method.factors:
        out.append(f"plan.granularity hidden ranks hidden dimensions by IGIA; use score.method igia, not {cfg.score.method}.")
    out += _check_blocks(cfg)
    if cfg.score.adapter not in ("lora", "dora"):
        out.append(f"score.adapter is {cfg.score.adapter!r}; use lora or dora.")
    return out + _check_heal(cfg)


def _check_blocks(cfg: RunConfig) -> list[str]:
    """Block plans come from a greedy block search, and a block search only makes block plans."""
    block_search = cfg.score.greedy_unit == "block" and cfg.score.method in ("greedy_loss", "igia_greedy")
    if cfg.score.greedy_unit not in ("layer", "block"):
        return [f"score.greedy_unit is {cfg.score.greedy_unit!r}; use layer or block."]
    if cfg.plan.granularity == "block" and not block_search:
        return ["plan.granularity block removes the block pairs a greedy block search found; set score.method "
                "igia_greedy (or greedy_loss) and score.greedy_unit: block."]
    if cfg.plan.granularity != "block" and cfg.score.greedy_unit == "block":
        return ["score.greedy_unit block searches attention/MLP block pairs, which only plan.granularity block uses; "
                "set both, or neither."]
    if cfg.plan.granularity == "block" and (cfg.plan.merge or cfg.heal.rule != "none"):
        return ["plan.granularity block does not combine with merging or healing yet; set plan.merge: 0 and "
                "heal.rule: none."]
    return []


def _check_runtime(cfg: RunConfig) -> list[str]:
    """The runtime resolved now: a device this machine lacks or a dtype it cannot run is refused before any
    stage starts, not after minutes of work."""
    from gradpruner.models.runtime import resolve

    try:
        resolve(cfg.runtime)
    except GradPrunerError as exc:
        return [f"runtime: {p}" for p in exc.problems]
    return []


def _check_heal(cfg: RunConfig) -> list[str]:
    from gradpruner.errors import lookup
    from gradpruner.healing.rules import HEAL_RULES

    try:
        lookup(HEAL_RULES, cfg.heal.rule, "heal rule (heal.rule)")
    except GradPrunerError as exc:
        return list(exc.problems)
    if cfg.heal.rule == "none":
        return []
    out = config_problems(cfg.heal, "heal.")
    if cfg.plan.granularity == "hidden":
        out.append("heal.rule folds a map across removed layers, but plan.granularity hidden removes none; set "
                   "heal.rule: none or plan.granularity: layer.")
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
