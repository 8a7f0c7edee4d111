"""The Python API: score → plan → prune (→ heal). The CLI is a thin layer over these functions.

Each stage validates everything it can before expensive work, writes readable files atomically
(``scores.json`` + ``igia.safetensors``, ``plan.json``, a ``save_pretrained`` folder) and records its
configuration next to its output, so every stage can be rerun alone.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from gradpruner.data.examples import load_examples, tokenize
from gradpruner.data.tasks import SPLIT_SEED
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.healing.config import HealConfig
from gradpruner.measure.costs import param_counts
from gradpruner.models import architectures, experts
from gradpruner.models.card import write_card
from gradpruner.models.loading import (
    base_model,
    check_model,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from gradpruner.planning import plans as planning
from gradpruner.planning.config import DEFAULT_PRUNE, PlanConfig
from gradpruner.pruning.config import PruneConfig
from gradpruner.report.plots import plot_layer_scores
from gradpruner.scoring.capture import IGIACallback
from gradpruner.scoring.config import ScoreConfig
from gradpruner.scoring.igia import IGIA_SCORES
from gradpruner.util import distributed, options
from gradpruner.util.atomic import atomic_dir, check_output, read_json, write_json
from gradpruner.util.versions import versions

log = logging.getLogger(__name__)
MIN_STEPS = 2          # the first step carries no signal (LoRA B starts at zero)
FRACTION_FLOOR = 8     # floor when T is given as a fraction of the planned run


def resolve_steps(steps: int | None, fraction: float | None = None, planned: int | None = None) -> int:
    """T directly, or as ``fraction`` of ``planned`` fine-tuning steps with a floor of 8."""
    if fraction is not None:
        if planned is None or planned < 1 or not 0 < fraction <= 1:
            raise GradPrunerError("--steps-fraction needs a value in (0, 1] and --planned-steps ≥ 1; give both or use --steps.")
        steps = max(FRACTION_FLOOR, math.ceil(fraction * planned))
    if steps is None or steps < MIN_STEPS:
        raise GradPrunerError(
            f"--steps {steps} is too few: the first optimizer step carries no signal because LoRA's B starts at zero; use --steps 2 or more (the paper uses about 1% of the run, e.g. 40)."
        )
    return int(steps)


def layer_param_counts(model) -> tuple[list[int], int]:
    """Parameters per decoder layer and in the whole model (tied weights counted once)."""
    _, _, layers = architectures.find_decoder_layers(model)
    return [sum(p.numel() for p in layer.parameters()) for layer in layers], param_counts(model)["total"]


# --- score ------------------------------------------------------------------------------------

def score(model: str, out: str | Path, task: str | None = None, data: str | Path | None = None,
          data_dir: str | Path | None = None, config: ScoreConfig | None = None, *, seed: int = 0,
          target: int | None = None, overwrite: bool = False, trust_remote_code: bool = False,
          allow_pickle: bool = False, **settings) -> dict:
    """Score every decoder layer and write scores.json (+ igia.safetensors for the IGIA methods).

    The settings are the fields of ``ScoreConfig`` (``method``, ``steps``, ``rank``, ``lr``, …): pass
    ``config`` or any of them as keywords. IGIA methods run T LoRA (or DoRA) optimizer steps; the
    other methods of ``scoring.methods.METHODS`` use ``calib_examples`` task examples (or none).
    ``target`` is the number of layers the plan will remove, which LaCo and the guard of
    ``igia_guarded`` need (default: the plan's default count).
    """
    from gradpruner.scoring.methods import METHODS, Context
    from gradpruner.scoring.variants import statistics, variant_scores

    c = options.settings(ScoreConfig, config, settings, "score setting")
    method, steps, rank, alpha, lr = c.method, c.steps, c.rank, c.alpha, c.lr
    batch_size, grad_accum, max_length, adapter = c.batch_size, c.grad_accum, c.max_length, c.adapter
    lora_dropout, max_grad_norm, calib_examples = c.lora_dropout, c.max_grad_norm, c.calib_examples
    steps_fraction, planned_steps = c.steps_fraction, c.planned_steps
    options_ = {"laco_group": c.laco_group, "laco_threshold": c.laco_threshold, "greedy_pool": c.greedy_pool,
                "greedy_pool_factor": c.greedy_pool_factor}
    target = DEFAULT_PRUNE if target is None else target
    with Collect() as check:  # every problem with the inputs, in one message, before any work
        spec = check(lookup, METHODS, method, "scoring method")
        if (spec is not None and spec.trains) or steps_fraction is not None:
            steps = check(resolve_steps, steps, steps_fraction, planned_steps)
        check.problems.extend(_score_flag_problems(adapter, calib_examples, rank, batch_size, grad_accum, lr))
        source = check(resolve_model, model)
        if source is not None:
            check(check_model, source, trust_remote_code, allow_pickle)
        check(check_output, out, overwrite, inputs=(source if isinstance(source, Path) else None,))
        examples = check(load_examples, task=task, data=data, split="train", data_dir=data_dir, seed=SPLIT_SEED)
    base = load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tok = load_tokenizer(source, trust_remote_code)
    features = tokenize(examples, tok, max_length=max_length)
    layer_params, total_params = layer_param_counts(base)
    prefix = architectures.decoder_layer_prefix(base)
    names = architectures.linear_module_names(base)
    params = experts.expert_parameter_names(base) if spec.lora_steps else []  # fused MoE experts (IGIA)
    experts.check_lora(params, adapter, lora_dropout, method)
    module_layer = {n: int(n[len(prefix) + 1:].split(".")[0]) for n in names + params}
    meta = {
        "model": str(source), "model_spec": str(model), "task": task, "data": str(data) if data else None,
        "rank": rank, "alpha": alpha, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
        "max_length": max_length, "seed": seed, "lora_dropout": lora_dropout, "max_grad_norm": max_grad_norm,
        "method": method, "adapter": adapter, "calib_examples": calib_examples,
        "train_examples": len(features), "layer_prefix": prefix, "layer_params": layer_params,
        "total_params": total_params, "model_type": base.config.model_type, "versions": versions(),
    }
    if distributed.world_size() > 1:
        meta["processes"] = distributed.world_size()

    def produce(tmp: Path | None) -> dict | None:
        """Score into ``tmp`` (process 0); the other processes (``tmp`` None) only take part in the training."""
        if spec.lora_steps:  # igia, igia_norm and the IGIA variants: the LoRA proxy with gradient capture
            stats = None
            if spec.kind == "variant" and tmp is not None:  # measured on the model as given, before any step
                stats = statistics(method, Context(base, tok, features, seed=seed, calib_examples=calib_examples,
                                                   batch_size=batch_size, target=target, options=options_))
            cb = IGIACallback(tmp or Path(out), steps=steps, module_layer=module_layer, num_layers=len(layer_params),
                              meta=meta)
            _train_lora(base, tok, features, names, cb, steps=steps, rank=rank, alpha=alpha, lr=lr,
                        batch_size=batch_size, grad_accum=grad_accum, seed=seed, dropout=lora_dropout,
                        max_grad_norm=max_grad_norm, adapter=adapter, work_dir=tmp / ".trainer" if tmp else None,
                        parameters=params)
            if tmp is None:
                return None
            result = read_json(tmp / "scores.json", "Scores file")
            result["method"] = method
            if spec.kind == "variant":
                result["layer_scores"] = variant_scores(method, base, result, tmp / "igia.safetensors", stats)
                result["variant_statistics"] = stats
            else:
                result["layer_scores"] = result["layer_scores_by_rule"][method]
        else:
            ctx = Context(base, tok, features, seed=seed, calib_examples=calib_examples, batch_size=batch_size,
                          steps=steps, lr=lr, target=target, options=options_)
            result = {**meta, "num_layers": len(layer_params), "steps": steps if spec.trains else 0, **spec.fn(ctx)}
            if tmp is None:
                return None
        if not all(math.isfinite(v) for v in result["layer_scores"]):
            raise GradPrunerError(f"Method {method} produced non-finite layer scores; lower --lr or check the data.")
        write_json(tmp / "scores.json", result)
        plot_layer_scores(result["layer_scores"], tmp / "layer_scores.png", title=f"{method} layer scores")
        return result

    def write() -> dict:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            return produce(tmp)

    return distributed.on_main(write, lambda: produce(None))  # process 0 writes; every process gets its result


def _score_flag_problems(adapter, calib_examples, rank, batch_size, grad_accum, lr) -> list[str]:
    out = []
    if adapter not in ("lora", "dora"):
        out.append(f"--adapter {adapter!r} is not known; use lora or dora.")
    if calib_examples < 1:
        out.append(f"--calib-examples {calib_examples} must be at least 1.")
    if rank < 1 or batch_size < 1 or grad_accum < 1 or batch_size % grad_accum:
        out.append("--rank and --batch-size must be ≥ 1 and --batch-size divisible by --grad-accum; fix the flags.")
    else:
        try:
            distributed.check_batch(batch_size, grad_accum)
        except GradPrunerError as exc:
            out.extend(exc.problems)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        out.append(f"--lr {lr} must be a positive number; use e.g. 1e-4.")
    return out


def _train_lora(base, tok, features, names, callback, *, steps, rank, alpha, lr, batch_size, grad_accum,
                seed, dropout, max_grad_norm, work_dir, adapter="lora", parameters=None) -> None:
    """Attach LoRA to every listed linear module (and fused expert parameter) and train ``steps``
    optimizer steps with ``callback``."""
    from transformers import set_seed

    from gradpruner.models.lora import attach_lora
    from gradpruner.scoring.methods import train_steps

    set_seed(seed)
    model = attach_lora(base, rank=rank, alpha=alpha, dropout=dropout, target_modules=names, adapter=adapter,
                        target_parameters=parameters)
    try:
        train_steps(model, tok, features, callback, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                    lr=lr, seed=seed, max_grad_norm=max_grad_norm, work_dir=work_dir, progress=True)
    finally:
        model.unload()  # leave the base model as it was


# --- plan -------------------------------------------------------------------------------------

def plan(scores: str | Path, out: str | Path, config: PlanConfig | None = None, *, model: str | None = None,
         overwrite: bool = False, **settings) -> dict:
    """Choose the layers to remove and to merge from a scores file and write plan.json.

    The settings are the fields of ``PlanConfig`` (``prune`` or ``target_params``, ``merge``, ``rule``,
    ``granularity``, ``protect_last``, ``max_block``): pass ``config`` or any of them as keywords. The N
    lowest-scoring layers are removed; of those, the M highest-scoring are merged into the nearest
    preceding kept layer. With ``granularity="hidden"`` (paper Appendix D) the same parameter budget
    is taken from the residual-stream width instead of from whole layers (see ``pruning.width``).
    ``target_latency`` and ``target_memory`` are measured on ``model`` (the model the scores came from)."""
    c = options.settings(PlanConfig, config, settings, "plan setting")
    targets = ("target_params", "target_latency", "target_memory")
    if any(settings.get(t) is not None for t in targets) and "prune" not in settings:
        c = dataclasses.replace(c, prune=None)  # a target given alone replaces the default count
    prune, target_params, merge, rule = c.prune, c.target_params, c.merge, c.from_method
    granularity, protect_last, max_block = c.granularity, c.protect_last, c.max_block
    with Collect() as check:
        data = check(_read_scores, scores)
        if rule is not None:
            check(lookup, IGIA_SCORES, rule, "IGIA method (from_method)")
        if sum(v is not None for v in (prune, target_params, c.target_latency, c.target_memory)) != 1:
            check.problems.append("Give exactly one of --prune N, --target-params FRACTION, --target-latency RATIO "
                                  "and --target-memory GIB.")
        elif (c.target_latency is not None or c.target_memory is not None) and model is None:
            check.problems.append("--target-latency and --target-memory are measured on the model: give --model "
                                  "(the model the scores came from).")
        if granularity not in ("layer", "hidden"):
            check.problems.append(f"--granularity {granularity!r} is not known; use layer or hidden.")
        check(check_output, out, overwrite)
    own = rule in (None, data.get("method", "igia"))  # the method's own scores; else an IGIA variant
    layer_scores = data["layer_scores"] if own else (data.get("layer_scores_by_rule") or {}).get(rule)
    if layer_scores is None:
        raise GradPrunerError(f"Scores file {scores} has no scores for rule {rule!r}; score again with this version of gradpruner.")
    if target_params is not None:
        if not data.get("layer_params"):
            raise GradPrunerError(f"Scores file {scores} records no layer_params; use --prune N instead of --target-params.")
        prune = planning.layers_for_target(layer_scores, data["layer_params"], data["total_params"], target_params)
    measured = None
    if prune is None:  # a measured target
        prune, measured = _measured_target(c, model, layer_scores, data)
    result = planning.make_plan(layer_scores, prune, merge, data.get("layer_params"), data.get("total_params"),
                                protect_last=protect_last, max_block=max_block)
    if granularity == "hidden":
        result = _hidden_plan(scores, data, result)
    if measured is not None:
        result["target"] = measured
    result.update({"scores_file": str(Path(scores).resolve()), "model": data.get("model"),
                   "method": data.get("method", "igia"), "score_rule": rule or data.get("method", "igia")})
    write_json(out, result)
    return result


def _measured_target(c: PlanConfig, model: str, layer_scores: list[float], data: dict) -> tuple[int, dict]:
    """How many layers a latency or memory target needs, measured on ``model``: (count, what was measured)."""
    import copy

    from gradpruner.measure import targets
    from gradpruner.pruning.surgery import remove_layers

    source = resolve_model(model)
    config = check_model(source)
    dense = load_model(source)
    _, _, layers = architectures.find_decoder_layers(dense)
    if len(layers) != len(layer_scores):
        raise GradPrunerError(f"Model {model} has {len(layers)} decoder layers but the scores have {len(layer_scores)}; "
                              "give the model the scores came from.")
    order = sorted(range(len(layers)), key=lambda j: (layer_scores[j], j))[:-1]  # make_plan's removal order
    if c.target_memory is not None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        itemsize = (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize
        per_layer = [targets.weight_bytes(layer, itemsize) for layer in layers]
        total = targets.weight_bytes(dense, itemsize)
        k = targets.layers_for_memory(total, per_layer, order, c.target_memory)
        after = total - sum(per_layer[j] for j in order[:k])
        return k, {"kind": "memory", "gib": c.target_memory, "bytes_before": total, "bytes_after": after,
                   "itemsize": itemsize}

    def build(k: int):
        small = copy.deepcopy(dense)
        remove_layers(small, sorted(set(range(len(layers))) - set(order[:k])))
        return small

    k, ratios = targets.layers_for_latency(dense, build, len(layers), c.target_latency, c.latency, echo=log.info)
    return k, {"kind": "latency", "latency": c.latency, "ratio_target": c.target_latency, "measured": ratios[k],
               "ratios": {str(n): r for n, r in sorted(ratios.items())}}


def _read_scores(scores) -> dict:
    data = read_json(scores, "Scores file")
    if not isinstance(data, dict) or "layer_scores" not in data:
        raise GradPrunerError(f"Scores file {scores} has no layer_scores; make it with `gradpruner score`.")
    return data


def _hidden_plan(scores, data: dict, layer_plan: dict) -> dict:
    """Keep every layer; drop residual-stream dimensions worth the layer plan's parameters."""
    from gradpruner.pruning import width

    factors = Path(scores).with_name("igia.safetensors")
    if not factors.is_file() or not layer_plan.get("params"):
        raise GradPrunerError(f"Hidden-size pruning needs the IGIA factors and layer sizes of `gradpruner score --method "
                              f"igia` beside {scores}; score with the igia method.")
    config = load_config(data["model"])
    d, removed = config.hidden_size, layer_plan["params"]["removed_fraction"]
    hidden = width.width_plan(width.dim_scores(factors, d), 1 - removed, multiple=config.num_attention_heads)
    total = layer_plan["params"]["total_before"]
    after = round(total * len(hidden["keep_dims"]) / d)
    n = layer_plan["num_layers"]
    return {"num_layers": n, "keep": list(range(n)), "drop": [], "merge": {}, "granularity": "hidden", "hidden": hidden,
            "layer_scores": layer_plan.get("layer_scores"),
            "params": {"total_before": total, "total_after": after, "removed_fraction": 1 - after / total},
            "rule": f"keep the {len(hidden['keep_dims'])} of {d} hidden dimensions with the largest IGIA, the "
                    f"parameter budget of removing {len(layer_plan['drop'])} layers"}


# --- prune ------------------------------------------------------------------------------------

def prune(model: str, plan: str | Path | dict, out: str | Path, igia: str | Path | None = None,
          config: PruneConfig | None = None, *, heal: str | HealConfig | None = None, task: str | None = None,
          data: str | Path | None = None, data_dir: str | Path | None = None, overwrite: bool = False,
          trust_remote_code: bool = False, allow_pickle: bool = False, **settings) -> dict:
    """Merge, remove layers and save a standard checkpoint to ``out``.

    ``heal`` (a heal rule's name, or a ``HealConfig``) other than ``none`` heals the pruned model in the
    same call on ``task``/``data`` (see ``heal``): ``out`` then holds the healed checkpoint, the result
    gets its heal.json record under ``"heal"``, and the unhealed one is not kept.

    The settings are the fields of ``PruneConfig`` (``density``, ``merge_rule``, ``out_of_core``,
    ``max_shard_size``): pass ``config`` or any of them as keywords. ``out_of_core`` True streams the
    checkpoint shard by shard without loading the model (``pruning.streamed``; output shards of at
    most ``max_shard_size``), False loads it, None (the default) streams whenever the input allows it
    (a local safetensors folder with the model's own tensor names, no hidden-size pruning). Both
    write the same tensors."""
    c = options.settings(PruneConfig, config, settings, "prune setting")
    healing = heal if isinstance(heal, HealConfig) or heal is None else HealConfig(rule=heal)
    if healing is not None and healing.rule != "none":
        return _prune_and_heal(model, plan, out, igia, c, healing, task=task, data=data, data_dir=data_dir,
                               overwrite=overwrite, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    density, merge_rule, out_of_core, max_shard_size = c.density, c.merge_rule, c.out_of_core, c.max_shard_size
    from gradpruner.models.loading import save_model
    from gradpruner.pruning.merging import MERGE_RULES, check_density, needs_igia
    from gradpruner.pruning.streamed import parse_size

    with Collect() as check:  # every problem with the inputs, in one message, before any work
        check(lookup, MERGE_RULES, merge_rule, "merge rule")
        check(check_density, density)
        shard_bytes = check(parse_size, max_shard_size)
        source = check(resolve_model, model)
        raw_plan = plan if isinstance(plan, dict) else check(_read_plan, plan)
        model_config = check(check_model, source, trust_remote_code, allow_pickle) if source is not None else None
        the_plan = None if raw_plan is None else check(
            planning.validate_plan, raw_plan, model_config.num_hidden_layers if model_config is not None else None)
        check(check_output, out, overwrite, inputs=(source if isinstance(source, Path) else None,))
        factors = None
        if the_plan is not None and the_plan["merge"] and merge_rule in MERGE_RULES and needs_igia(merge_rule):
            factors = check(_factor_path, the_plan, igia, plan)
            if factors is not None:
                check(_check_factor_names, factors, the_plan, merge_rule)
    stream = _choose_streaming(out_of_core, source, model_config, the_plan)
    meta = {"plan": the_plan, "density": density, "merge_rule": merge_rule, "source": str(source),
            "base_model": base_model(model),
            "igia": str(factors) if factors else None, "out_of_core": stream, "versions": versions()}
    if stream:
        from gradpruner.pruning.streamed import prune_streaming

        with atomic_dir(out, overwrite=overwrite) as tmp:
            meta["merge_stats"] = prune_streaming(source, model_config, the_plan, tmp, factors, density, merge_rule,
                                                  shard_bytes)
            write_json(tmp / "gradpruner.json", meta)
            write_card(tmp)
        return meta
    model_obj, tok, meta["merge_stats"] = _prune_in_memory(source, model_config, the_plan, factors, density, merge_rule,
                                                           trust_remote_code, allow_pickle)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model(model_obj, tok, tmp, extra_files={"gradpruner.json": meta})
    return meta


def _prune_and_heal(model, plan, out, igia, config: PruneConfig, healing: HealConfig, *, task, data, data_dir,
                    overwrite: bool, trust_remote_code: bool, allow_pickle: bool) -> dict:
    """Prune into a hidden folder beside ``out``, heal from it into ``out``, remove the folder."""
    import tempfile

    from gradpruner.healing.config import config_problems
    from gradpruner.healing.rules import HEAL_RULES

    with Collect() as check:  # the heal inputs, before the pruning work
        check(lookup, HEAL_RULES, healing.rule, "heal rule")
        check.problems.extend(config_problems(healing))
        check(load_examples, task=task, data=data, split="train", data_dir=data_dir, seed=SPLIT_SEED)
        source = check(resolve_model, model)
        check(check_output, out, overwrite, inputs=(source if isinstance(source, Path) else None,))
    parent = Path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".{Path(out).name}.unhealed-") as tmp:
        meta = prune(model, plan, Path(tmp) / "pruned", igia, config, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle)
        meta["heal"] = heal(model, Path(tmp) / "pruned", out, plan, task=task, data=data, data_dir=data_dir,
                            config=healing, overwrite=overwrite, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    return meta


def _choose_streaming(out_of_core: bool | None, source, config, the_plan: dict) -> bool:
    from gradpruner.pruning.streamed import stream_problem

    if out_of_core is False:
        return False
    problem = stream_problem(source, config, the_plan)
    if problem is not None and out_of_core:
        raise GradPrunerError(f"--out-of-core cannot prune {source}: {problem}; drop --out-of-core to load "
                              "the model into memory instead.")
    return problem is None


def _prune_in_memory(source, config, the_plan: dict, factors, density: float, merge_rule: str,
                     trust_remote_code: bool, allow_pickle: bool):
    from gradpruner.pruning.merging import merge_layers
    from gradpruner.pruning.surgery import remove_layers

    model_obj = load_model(source, dtype=getattr(config, "dtype", None) or torch.float32,
                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tok = load_tokenizer(source, trust_remote_code)
    stats = merge_layers(model_obj, the_plan["merge"], factors, density, merge_rule) if the_plan["merge"] else {}
    remove_layers(model_obj, the_plan["keep"])
    if the_plan.get("hidden") is not None:
        from gradpruner.pruning.width import prune_width, validate_width

        prune_width(model_obj, validate_width(the_plan["hidden"], model_obj.config))
    return model_obj, tok, stats


def _read_plan(path) -> dict:
    data = read_json(path, "Plan file")
    if not isinstance(data, dict):
        raise GradPrunerError(f"Plan file {path} holds a JSON {type(data).__name__}, not an object with num_layers, "
                              "keep and drop; fix it or make it with `gradpruner plan`.")
    return data



def _factor_path(the_plan: dict, igia, plan_arg) -> Path:
    if igia is None and the_plan.get("scores_file"):
        igia = Path(the_plan["scores_file"]).with_name("igia.safetensors")
    if igia is None:
        raise GradPrunerError("The plan merges layers but no --igia file was given; pass --igia DIR/igia.safetensors from `gradpruner score`.")
    igia = Path(igia)
    if not igia.is_file():
        raise GradPrunerError(f"IGIA file {igia} does not exist, and the merge rule needs it; pass --igia with the "
                              "igia.safetensors of `gradpruner score --method igia`, or use --merge-rule ties, laco or none.")
    return igia


def _check_factor_names(factors: Path, the_plan: dict, merge_rule: str) -> None:
    """Every merged source layer (and, for fisher, its target) must have factors for its modules."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(factors), "pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise GradPrunerError(f"IGIA file {factors} cannot be read ({exc}); rerun `gradpruner score`.") from None
    layers = {int(s) for s in the_plan["merge"]}
    if merge_rule == "fisher":
        layers |= set(the_plan["merge"].values())
    have = {int(k.split(".layers.")[1].split(".")[0]) for k in keys if ".layers." in k and k.endswith(".grad_A")}
    missing = sorted(layers - have)
    if missing:
        raise GradPrunerError(
            f"IGIA file {factors} has no gradient factors for layer(s) {missing} that the plan merges; "
            "score the same model again or change the plan."
        )


# --- heal -------------------------------------------------------------------------------------

def heal(model_dense: str, pruned: str | Path, out: str | Path, plan: str | Path | dict, task: str | None = None,
         data: str | Path | None = None, data_dir: str | Path | None = None, config: HealConfig | None = None, *,
         overwrite: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False, **settings) -> dict:
    """Heal a pruned model against its dense original and save a standard checkpoint with heal.json to ``out``.

    The settings are the fields of ``HealConfig`` (``rule``, ``objective``, ``tokens``, ``alpha``,
    ``calib_examples``, …): pass ``config`` or any of them as keywords. ``plan`` is the plan that made
    ``pruned`` from ``model_dense``. For every run of removed layers with a kept layer before it, a
    linear map fitted on task training examples is folded into that layer's down_proj (ReplaceMe; see
    ``healing.rules``); heal.json records each cut's hidden-state error and the held-out loss before and after.
    """
    from gradpruner.healing.config import config_problems
    from gradpruner.healing.heal import heal_model, make_batches, split_features
    from gradpruner.healing.rules import HEAL_RULES
    from gradpruner.models.loading import save_model

    c = options.settings(HealConfig, config, settings, "heal setting")
    with Collect() as check:  # every problem with the inputs, in one message, before any work
        check(lookup, HEAL_RULES, c.rule, "heal rule")
        check.problems.extend(config_problems(c))
        dense = check(resolve_model, model_dense)
        dense_config = check(check_model, dense, trust_remote_code, allow_pickle) if dense is not None else None
        small = check(resolve_model, pruned)
        small_config = check(check_model, small, trust_remote_code, allow_pickle) if small is not None else None
        raw_plan = plan if isinstance(plan, dict) else check(_read_plan, plan)
        the_plan = None if raw_plan is None else check(
            planning.validate_plan, raw_plan, dense_config.num_hidden_layers if dense_config is not None else None)
        if the_plan is not None and small_config is not None and dense_config is not None:
            check(_check_heal_plan, the_plan, dense, small, dense_config, small_config)
        inputs = tuple(p for p in (dense, small) if isinstance(p, Path))
        check(check_output, out, overwrite, inputs=inputs)
        examples = check(load_examples, task=task, data=data, split="train", data_dir=data_dir, seed=SPLIT_SEED)
    dense_model = load_model(dense, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    small_model = load_model(small, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tok = load_tokenizer(small, trust_remote_code)
    fit, held = split_features(tokenize(examples, tok, max_length=c.max_length), c.calib_examples, c.heldout_examples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dense_model.to(device)
    small_model.to(device)
    report = heal_model(dense_model, small_model, the_plan["keep"], make_batches(fit, tok.pad_token_id, c.batch_size, device),
                        make_batches(held, tok.pad_token_id, c.batch_size, device), c)
    del dense_model
    report.update({"model": str(dense), "base_model": base_model(model_dense), "pruned": str(small), "task": task,
                   "data": str(data) if data else None,
                   "plan": {k: the_plan[k] for k in ("num_layers", "keep", "drop")}, "versions": versions()})
    extra = {"heal.json": report}
    if isinstance(small, Path) and (small / "gradpruner.json").is_file():
        extra["gradpruner.json"] = read_json(small / "gradpruner.json", "Prune record")
    dtype = getattr(small_config, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float32:
        small_model.to(dtype)  # fitted in float32, saved as the pruned checkpoint was
        small_model.config.dtype = dtype
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model(small_model, tok, tmp, extra_files=extra)
    return report


def _check_heal_plan(the_plan: dict, dense, small, dense_config, small_config) -> None:
    """The plan made ``small`` from ``dense``: layer-level, as many kept layers as ``small`` has, same width."""
    if the_plan.get("granularity") == "hidden" or the_plan.get("hidden") is not None:
        raise GradPrunerError("The plan prunes the hidden size, not whole layers; healing folds a map across removed "
                              "layers, so use a layer plan (plan --granularity layer).")
    if len(the_plan["keep"]) != small_config.num_hidden_layers:
        raise GradPrunerError(f"The plan keeps {len(the_plan['keep'])} layers but the pruned model {small} has "
                              f"{small_config.num_hidden_layers}; give the plan that pruned it.")
    if getattr(dense_config, "hidden_size", None) != getattr(small_config, "hidden_size", None):
        raise GradPrunerError(f"The pruned model {small} has hidden size {small_config.hidden_size}, the dense model "
                              f"{dense} {dense_config.hidden_size}; give the dense model it was pruned from.")
    record = Path(str(small)) / "gradpruner.json"
    made = read_json(record, "Prune record").get("plan") if record.is_file() else None
    if isinstance(made, dict) and made.get("keep") is not None and sorted(made["keep"]) != the_plan["keep"]:
        raise GradPrunerError(f"The pruned model {small} was made by a plan keeping layers {sorted(made['keep'])}, not "
                              f"{the_plan['keep']}; give the plan that pruned it.")
