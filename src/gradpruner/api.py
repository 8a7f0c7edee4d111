"""The Python API: score → plan → prune. The CLI is a thin layer over these functions.

Each stage validates everything it can before expensive work, writes readable files atomically
(``scores.json`` + ``igia.safetensors``, ``plan.json``, a ``save_pretrained`` folder) and records its
configuration next to its output, so every stage can be rerun alone.
"""
from __future__ import annotations

import logging
import math
import platform
from pathlib import Path

import torch

from gradpruner import __version__

from gradpruner.models import architectures

from gradpruner.util import distributed

from gradpruner.pruning import experts

from gradpruner.planning import plans as planning
from gradpruner.util.atomic import atomic_dir, check_output, read_json, write_json
from gradpruner.scoring.capture import IGIACallback
from gradpruner.measure.costs import param_counts
from gradpruner.data.examples import load_examples, tokenize
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.models.loading import check_model, load_config, load_model, load_tokenizer, resolve_model
from gradpruner.report.plots import plot_layer_scores
from gradpruner.scoring.igia import SCORE_RULES
from gradpruner.data.tasks import SPLIT_SEED

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


def _versions() -> dict:
    import peft
    import transformers

    return {"gradpruner": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


# --- score ------------------------------------------------------------------------------------

def score(model: str, out: str | Path, task: str | None = None, data: str | Path | None = None,
          data_dir: str | Path | None = None, method: str = "igia", steps: int | None = 40,
          steps_fraction: float | None = None,
          planned_steps: int | None = None, rank: int = 8, alpha: float = 32, lr: float = 1e-4,
          batch_size: int = 8, grad_accum: int = 1, max_length: int = 512, seed: int = 0,
          lora_dropout: float = 0.0, max_grad_norm: float = 0.0, adapter: str = "lora",
          calib_examples: int = 64, target: int | None = None, options: dict | None = None,
          overwrite: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Score every decoder layer with ``method`` and write scores.json (+ igia.safetensors for IGIA).

    IGIA methods run T LoRA (or DoRA, ``adapter="dora"``) optimizer steps; the other methods of
    ``selection.METHODS`` use ``calib_examples`` task examples (or none); ``target`` is the number of
    layers to remove, which only LaCo needs.
    """
    from gradpruner.scoring.methods import METHODS, Context
    from gradpruner.scoring.variants import VARIANTS, statistics, variant_scores

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
    params = experts.expert_parameter_names(base) if spec.fn is None else []  # fused MoE experts (IGIA)
    experts.check_lora(params, adapter, lora_dropout, method)
    module_layer = {n: int(n[len(prefix) + 1:].split(".")[0]) for n in names + params}
    meta = {
        "model": str(source), "model_spec": str(model), "task": task, "data": str(data) if data else None,
        "rank": rank, "alpha": alpha, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
        "max_length": max_length, "seed": seed, "lora_dropout": lora_dropout, "max_grad_norm": max_grad_norm,
        "method": method, "adapter": adapter, "calib_examples": calib_examples,
        "train_examples": len(features), "layer_prefix": prefix, "layer_params": layer_params,
        "total_params": total_params, "model_type": base.config.model_type, "versions": _versions(),
    }
    if distributed.world_size() > 1:
        meta["processes"] = distributed.world_size()

    def produce(tmp: Path | None) -> dict | None:
        """Score into ``tmp`` (process 0); the other processes (``tmp`` None) only take part in the training."""
        if spec.fn is None:  # igia, igia_norm and the IGIA variants: the LoRA proxy with gradient capture
            stats = None
            if method in VARIANTS and tmp is not None:  # measured on the model as given, before any step
                stats = statistics(method, Context(base, tok, features, seed=seed, calib_examples=calib_examples,
                                                   batch_size=batch_size, target=target))
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
            if method in VARIANTS:
                result["layer_scores"] = variant_scores(method, base, result, tmp / "igia.safetensors", stats)
                result["variant_statistics"] = stats
            else:
                result["layer_scores"] = result["layer_scores_by_rule"][method]
        else:
            ctx = Context(base, tok, features, seed=seed, calib_examples=calib_examples, batch_size=batch_size,
                          steps=steps, lr=lr, target=target, options=dict(options or {}))
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
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from gradpruner.scoring.methods import train_steps

    set_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                     task_type="CAUSAL_LM", use_dora=adapter == "dora", target_parameters=parameters or None)
    model = get_peft_model(base, cfg)
    try:
        train_steps(model, tok, features, callback, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                    lr=lr, seed=seed, max_grad_norm=max_grad_norm, work_dir=work_dir, progress=True)
    finally:
        model.unload()  # leave the base model as it was


# --- plan -------------------------------------------------------------------------------------

def plan(scores: str | Path, out: str | Path, prune: int | None = None, target_params: float | None = None,
         merge: int = 0, rule: str | None = None, granularity: str = "layer", protect_last: int = 0,
         max_block: int | None = None, overwrite: bool = False) -> dict:
    """Apply the GUIDE §1.5 rule to a scores file and write plan.json.

    With ``granularity="hidden"`` (paper Appendix D) the same parameter budget is taken from the
    residual-stream width instead of from whole layers (see ``width``)."""
    with Collect() as check:
        data = check(_read_scores, scores)
        if rule is not None:
            check(lookup, SCORE_RULES, rule, "score rule")
        if (prune is None) == (target_params is None):
            check.problems.append("Give exactly one of --prune N or --target-params FRACTION.")
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
    result = planning.make_plan(layer_scores, prune, merge, data.get("layer_params"), data.get("total_params"),
                                protect_last=protect_last, max_block=max_block)
    if granularity == "hidden":
        result = _hidden_plan(scores, data, result)
    result.update({"scores_file": str(Path(scores).resolve()), "model": data.get("model"),
                   "method": data.get("method", "igia"), "score_rule": rule or data.get("method", "igia")})
    write_json(out, result)
    return result


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
          density: float = 0.2, merge_rule: str = "sign_sum", overwrite: bool = False,
          trust_remote_code: bool = False, allow_pickle: bool = False, out_of_core: bool | None = None,
          max_shard_size: str | int = "2GB") -> dict:
    """Merge, remove layers and save a standard checkpoint to ``out`` (GUIDE §1.6–1.7).

    ``out_of_core``: True streams the checkpoint shard by shard without loading the model
    (``gradpruner.pruning.streamed``; output shards of at most ``max_shard_size``), False loads it, None (the
    default) streams whenever the input allows it (a local safetensors folder with the model's own
    tensor names, no hidden-size pruning). Both write the same tensors."""
    from gradpruner.pruning.merging import MERGE_RULES, check_density, needs_igia
    from gradpruner.pruning.streamed import parse_size
    from gradpruner.pruning.surgery import save_model

    with Collect() as check:  # every problem with the inputs, in one message, before any work
        check(lookup, MERGE_RULES, merge_rule, "merge rule")
        check(check_density, density)
        shard_bytes = check(parse_size, max_shard_size)
        source = check(resolve_model, model)
        raw_plan = plan if isinstance(plan, dict) else check(_read_plan, plan)
        config = check(check_model, source, trust_remote_code, allow_pickle) if source is not None else None
        the_plan = None if raw_plan is None else check(
            planning.validate_plan, raw_plan, config.num_hidden_layers if config is not None else None)
        check(check_output, out, overwrite, inputs=(source if isinstance(source, Path) else None,))
        factors = None
        if the_plan is not None and the_plan["merge"] and merge_rule in MERGE_RULES and needs_igia(merge_rule):
            factors = check(_factor_path, the_plan, igia, plan)
            if factors is not None:
                check(_check_factor_names, factors, the_plan, merge_rule)
    stream = _choose_streaming(out_of_core, source, config, the_plan)
    meta = {"plan": the_plan, "density": density, "merge_rule": merge_rule, "source": str(source),
            "igia": str(factors) if factors else None, "out_of_core": stream, "versions": _versions()}
    if stream:
        from gradpruner.pruning.streamed import prune_streaming

        with atomic_dir(out, overwrite=overwrite) as tmp:
            meta["merge_stats"] = prune_streaming(source, config, the_plan, tmp, factors, density, merge_rule,
                                                  shard_bytes)
            write_json(tmp / "gradpruner.json", meta)
        return meta
    model_obj, tok, meta["merge_stats"] = _prune_in_memory(source, config, the_plan, factors, density, merge_rule,
                                                           trust_remote_code, allow_pickle)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model(model_obj, tok, tmp, extra_files={"gradpruner.json": meta})
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
