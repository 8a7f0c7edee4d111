"""The run configuration: one YAML file, overridable by ``key=value`` arguments.

Every key is a dataclass field with a default and a comment; the YAML and the CLI overrides fill the
same objects, unknown keys get a did-you-mean error, and the resolved config is written next to the
run's outputs. Documented key by key in docs/config.md.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from gradpruner.errors import GradPrunerError


@dataclass
class ScoreConfig:
    method: str = "igia_guarded"  # default: IGIA among the layers block influence lets go; igia = the paper's exact method; see docs/methods.md
    steps: int = 40              # early LoRA optimizer steps T (≥ 2; step 1 carries no signal)
    rank: int = 8
    alpha: float = 32
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    adapter: str = "lora"        # lora | dora: the adapter whose gradients IGIA reads
    calib_examples: int = 64     # task examples for block_influence, taylor and laco
    laco_group: int = 4          # laco: layers per collapse (the base + group−1 merged into it)
    laco_threshold: float = 0.65  # laco: keep a collapse if hidden states stay this cosine-similar


@dataclass
class PlanConfig:
    prune: int | None = 12       # decoder layers removed (merged ones included); or use target_params
    target_params: float | None = None  # fraction of all parameters to remove (instead of prune)
    merge: int = 3               # of the removed layers, how many are merged
    rule: str | None = None      # None: the scoring method's own scores; igia | igia_norm: that IGIA variant
    granularity: str = "layer"   # layer | hidden: remove whole layers, or the same parameters as hidden dimensions
    protect_last: int = 0        # never remove the last k layers
    max_block: int | None = None  # never remove more than this many consecutive layers


@dataclass
class PruneConfig:
    density: float = 0.2         # fraction of a merged module's entries kept, by IGIA
    merge_rule: str = "sign_sum"  # sign_sum | sign_mean | fisher | weighted_average | ties | none | laco


@dataclass
class FinetuneStageConfig:
    mode: str = "lora"           # lora | full
    lr: float | None = None      # None: 2e-4 for LoRA, 1e-5 for full fine-tuning
    epochs: float = 3.0          # the paper trains 3 epochs
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    rank: int = 8
    alpha: float = 32
    limit: int | None = None     # use only the first K training examples
    dense_baseline: bool = True  # also fine-tune the dense model the same way
    distill: str | None = None   # pruned fine-tune only: null | dense_ft | dense — the teacher whose logits join the loss
    distill_alpha: float = 0.5   # weight of the distillation term (1 − alpha for the labels)
    distill_temperature: float = 1.0


@dataclass
class EvalConfig:
    limit: int | None = None     # evaluate on the first K held-out examples (None: all)
    offset: int = 0              # skip the first N held-out examples first (a validation slice disjoint from the test one)
    batch_size: int = 8
    zero_shot_dense: bool = True  # also evaluate the dense model before fine-tuning
    pruned_no_finetune: bool = True  # also evaluate the pruned model before fine-tuning
    encoder: str | None = None   # BERTScore encoder folder (generative tasks); None: the packaged MiniLM


@dataclass
class RunConfig:
    model: str = "smollm2-135m"  # local folder, .gguf, alias or Hub id
    task: str | None = "arc_easy"  # built-in task, or None with data
    data: str | None = None      # JSONL of prompt/completion lines (instead of task)
    eval_data: str | None = None  # held-out JSONL to evaluate on (required with data; must not overlap it)
    data_dir: str | None = None  # task data folder (default: $GRADPRUNER_DATA_DIR or ../shared/data)
    out: str = "runs/run"        # run folder: every stage writes here
    seed: int = 0
    score: ScoreConfig = field(default_factory=ScoreConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


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


def _build(cls, data: dict, where: str = "", problems: list | None = None):
    known = _known(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            problems.append(_unknown_key(str(key), known, where))
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
    if (cfg.plan.prune is None) == (cfg.plan.target_params is None):
        out.append("Give exactly one of plan.prune and plan.target_params (set the other to null).")
    if cfg.finetune.distill not in (None, "dense_ft", "dense"):
        out.append(f"finetune.distill is {cfg.finetune.distill!r}; use null, dense_ft (the dense fine-tuned model) or dense.")
    elif cfg.finetune.distill == "dense_ft" and not cfg.finetune.dense_baseline:
        out.append("finetune.distill dense_ft needs finetune.dense_baseline: true (the teacher is that model).")
    if cfg.finetune.mode not in ("lora", "full"):
        out.append(f"finetune.mode is {cfg.finetune.mode!r}; use lora or full.")
    out += _check_methods(cfg)
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
    from gradpruner.scoring.variants import needs_target
    from gradpruner.scoring.methods import METHODS

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
    if cfg.plan.rule is not None and cfg.plan.rule != cfg.score.method and not (
            method.factors and cfg.plan.rule in ("igia", "igia_norm")):
        out.append(f"plan.rule {cfg.plan.rule!r} does not fit score.method {cfg.score.method}; leave plan.rule null "
                   "(the method's own scores) or, for IGIA scores, use igia or igia_norm.")
    if cfg.score.method == "laco" and cfg.plan.prune is None:
        out.append("score.method laco needs plan.prune (the number of layers to collapse), not plan.target_params.")
    if needs_target(cfg.score.method) and cfg.plan.prune is None:
        out.append(f"score.method {cfg.score.method} needs plan.prune (its guard's pool is sized from it), not plan.target_params.")
    if cfg.plan.granularity not in ("layer", "hidden"):
        out.append(f"plan.granularity is {cfg.plan.granularity!r}; use layer or hidden.")
    elif cfg.plan.granularity == "hidden" and not method.factors:
        out.append(f"plan.granularity hidden ranks hidden dimensions by IGIA; use score.method igia, not {cfg.score.method}.")
    if cfg.score.adapter not in ("lora", "dora"):
        out.append(f"score.adapter is {cfg.score.adapter!r}; use lora or dora.")
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
