"""``score``: the LoRA steps with gradient capture (IGIA) or another scoring method, then scores.json."""

import math
from pathlib import Path

import torch

from gradpruner.data.examples import load_examples, tokenize
from gradpruner.data.tasks import SPLIT_SEED
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.measure.costs import param_counts
from gradpruner.models import architectures, experts, sharding
from gradpruner.models.runtime import resolve as resolve_runtime
from gradpruner.models.loading import (
    check_model,
    load_model,
    load_tokenizer,
    resolve_model,
)
from gradpruner.planning.config import DEFAULT_PRUNE
from gradpruner.report.plots import plot_layer_scores
from gradpruner.scoring.capture import IGIACallback
from gradpruner.scoring.config import ScoreConfig
from gradpruner.util import distributed, options
from gradpruner.util.atomic import atomic_dir, check_output, read_json, write_json
from gradpruner.util.versions import versions

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



def score(model: str, out: str | Path, task: str | None = None, data: str | Path | None = None,
          data_dir: str | Path | None = None, config: ScoreConfig | None = None, *, seed: int = 0,
          target: int | None = None, overwrite: bool = False, runtime=None, **settings) -> dict:
    """Score every decoder layer and write scores.json (+ igia.safetensors for the IGIA methods).

    The settings are the fields of ``ScoreConfig`` (``method``, ``steps``, ``rank``, ``lr``, …): pass
    ``config`` or any of them as keywords. IGIA methods run T LoRA (or DoRA) optimizer steps; the
    other methods of ``scoring.methods.METHODS`` use ``calib_examples`` task examples (or none).
    ``target`` is the number of layers the plan will remove, which LaCo and the guard of
    ``igia_guarded`` need (default: the plan's default count). ``runtime`` (a ``RuntimeConfig``, a
    resolved ``Runtime`` or None for auto) says where the model runs and in which precision: the base
    weights in its dtype, the LoRA factors in float32 with autocast (``models.runtime``).
    """
    from gradpruner.scoring.methods import METHODS, Context
    from gradpruner.scoring.variants import READS_MODEL, statistics, variant_scores

    c = options.settings(ScoreConfig, config, settings, "score setting")
    method, steps, rank, alpha, lr = c.method, c.steps, c.rank, c.alpha, c.lr
    batch_size, grad_accum, max_length, adapter = c.batch_size, c.grad_accum, c.max_length, c.adapter
    lora_dropout, max_grad_norm, calib_examples = c.lora_dropout, c.max_grad_norm, c.calib_examples
    steps_fraction, planned_steps = c.steps_fraction, c.planned_steps
    options_ = {"laco_group": c.laco_group, "laco_threshold": c.laco_threshold, "greedy_pool": c.greedy_pool,
                "greedy_pool_factor": c.greedy_pool_factor, "greedy_unit": c.greedy_unit}
    target = DEFAULT_PRUNE if target is None else target
    with Collect() as check:  # every problem with the inputs, in one message, before any work
        spec = check(lookup, METHODS, method, "scoring method")
        if (spec is not None and spec.trains) or steps_fraction is not None:
            steps = check(resolve_steps, steps, steps_fraction, planned_steps)
        check.problems.extend(_score_flag_problems(adapter, calib_examples, rank, batch_size, grad_accum, lr))
        rt = check(resolve_runtime, runtime)
        check(sharding.check_launch, c.fsdp, spec is None or spec.lora_steps, method)
        source = check(resolve_model, model)
        if source is not None and rt is not None:
            check(check_model, source, rt.trust_remote_code, rt.allow_pickle)
        check(check_output, out, overwrite, inputs=(source if isinstance(source, Path) else None,))
        examples = check(load_examples, task=task, data=data, split="train", data_dir=data_dir, seed=SPLIT_SEED)
    # the runtime's precision for a frozen base (LoRA steps, forward passes); weights a method trains in float32
    base = load_model(source, rt, dtype=torch.float32 if spec.trains and not spec.lora_steps else None)
    tok = load_tokenizer(source, rt.trust_remote_code)
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
        "total_params": total_params, "model_type": base.config.model_type, "runtime": rt.record(),
        "versions": versions(),
    }
    if distributed.world_size() > 1:
        meta["processes"] = distributed.world_size()
    if c.fsdp:
        meta["sharding"] = {"kind": sharding.KIND, "processes": distributed.world_size()}

    def produce(tmp: Path | None) -> dict | None:
        """Score into ``tmp`` (process 0); the other processes (``tmp`` None) only take part in the training."""
        if spec.lora_steps:  # igia, igia_norm and the IGIA variants: the LoRA proxy with gradient capture
            stats = None
            if spec.kind == "variant" and tmp is not None:  # measured on the model as given, before any step
                stats = statistics(method, Context(base, tok, features, runtime=rt, seed=seed, calib_examples=calib_examples,
                                                   batch_size=batch_size, target=target, options=options_))
            cb = IGIACallback(tmp or Path(out), steps=steps, module_layer=module_layer, num_layers=len(layer_params),
                              meta=meta)
            _train_lora(base, tok, features, names, cb, steps=steps, rank=rank, alpha=alpha, lr=lr,
                        batch_size=batch_size, grad_accum=grad_accum, seed=seed, dropout=lora_dropout,
                        max_grad_norm=max_grad_norm, adapter=adapter, work_dir=tmp / ".trainer" if tmp else None,
                        parameters=params, runtime=rt, fsdp=c.fsdp)
            if tmp is None:
                return None
            result = read_json(tmp / "scores.json", "Scores file")
            result["method"] = method
            if spec.kind == "variant":
                # --fsdp left ``base`` sharded over the processes: a variant that reads it gets a whole copy
                whole = load_model(source, rt) if c.fsdp and method in READS_MODEL else base
                result["layer_scores"] = variant_scores(method, whole, result, tmp / "igia.safetensors", stats)
                result["variant_statistics"] = stats
            else:
                result["layer_scores"] = result["layer_scores_by_rule"][method]
        else:
            ctx = Context(base, tok, features, runtime=rt, seed=seed, calib_examples=calib_examples, batch_size=batch_size,
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
                seed, dropout, max_grad_norm, work_dir, adapter="lora", parameters=None, runtime=None,
                fsdp=False) -> None:
    """Attach LoRA to every listed linear module (and fused expert parameter) and train ``steps``
    optimizer steps with ``callback``; ``fsdp``: sharded with FSDP2 over the processes first
    (``models.sharding``), which leaves ``base`` sharded."""
    from transformers import set_seed

    from gradpruner.models.lora import attach_lora
    from gradpruner.scoring.methods import train_steps

    set_seed(seed)
    model = attach_lora(base, rank=rank, alpha=alpha, dropout=dropout, target_modules=names, adapter=adapter,
                        target_parameters=parameters)
    if fsdp:
        sharding.shard(model)
    try:
        train_steps(model, tok, features, callback, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                    lr=lr, seed=seed, max_grad_norm=max_grad_norm, work_dir=work_dir, progress=True, runtime=runtime)
    finally:
        if not fsdp:
            model.unload()  # leave the base model as it was
