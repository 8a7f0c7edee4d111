"""``plan``: the layers to remove and merge, by count, parameter share, measured latency or memory."""

import dataclasses
import logging
from pathlib import Path

from gradpruner.api.inputs import read_scores
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.models import architectures
from gradpruner.models.loading import (
    check_model,
    load_config,
    load_model,
    meta_model,
    resolve_model,
    stored_dtype,
)
from gradpruner.planning import blocks as planning_blocks
from gradpruner.planning import plans as planning
from gradpruner.models.runtime import resolve as resolve_runtime
from gradpruner.planning.config import PlanConfig
from gradpruner.scoring.igia import IGIA_SCORES
from gradpruner.util import options
from gradpruner.util.atomic import check_output, write_json

log = logging.getLogger(__name__)


def plan(scores: str | Path, out: str | Path, config: PlanConfig | None = None, *, model: str | None = None,
         overwrite: bool = False, runtime=None, **settings) -> dict:
    """Choose the layers to remove and to merge from a scores file and write plan.json.

    The settings are the fields of ``PlanConfig`` (``prune`` or ``target_params``, ``merge``, ``rule``,
    ``granularity``, ``protect_last``, ``max_block``): pass ``config`` or any of them as keywords. The N
    lowest-scoring layers are removed; of those, the M highest-scoring are merged into the nearest
    preceding kept layer. With ``granularity="hidden"`` (paper Appendix D) the same parameter budget
    is taken from the residual-stream width instead of from whole layers (see ``pruning.width``).
    ``target_latency`` and ``target_memory`` are measured on ``model`` (the model the scores came from),
    latency where ``runtime`` says (device and dtype; default auto)."""
    c = options.settings(PlanConfig, config, settings, "plan setting")
    targets = ("target_params", "target_latency", "target_memory")
    if any(settings.get(t) is not None for t in targets) and "prune" not in settings:
        c = dataclasses.replace(c, prune=None)  # a target given alone replaces the default count
    prune, target_params, merge, rule = c.prune, c.target_params, c.merge, c.from_method
    granularity, protect_last, max_block = c.granularity, c.protect_last, c.max_block
    with Collect() as check:
        data = check(read_scores, scores)
        if rule is not None:
            check(lookup, IGIA_SCORES, rule, "IGIA method (from_method)")
        if sum(v is not None for v in (prune, target_params, c.target_latency, c.target_memory)) != 1:
            check.problems.append("Give exactly one of --prune N, --target-params FRACTION, --target-latency RATIO "
                                  "and --target-memory GIB.")
        elif (c.target_latency is not None or c.target_memory is not None) and model is None:
            check.problems.append("--target-latency and --target-memory are measured on the model: give --model "
                                  "(the model the scores came from).")
        if granularity not in ("layer", "hidden", "block"):
            check.problems.append(f"--granularity {granularity!r} is not known; use layer, hidden or block.")
        elif data is not None:
            check.problems.extend(_block_problems(c, data, scores))
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
        prune, measured = _measured_target(c, model, layer_scores, data, runtime)
    result = planning.make_plan(layer_scores, prune, merge, data.get("layer_params"), data.get("total_params"),
                                protect_last=protect_last, max_block=max_block)
    if granularity == "hidden":
        result = _hidden_plan(scores, data, result)
    elif granularity == "block":
        result = planning_blocks.block_plan(_block_order(data), prune, len(layer_scores), data.get("layer_params"),
                                            data.get("total_params"))
    if measured is not None:
        result["target"] = measured
    result.update({"scores_file": str(Path(scores).resolve()), "model": data.get("model"),
                   "method": data.get("method", "igia"), "score_rule": rule or data.get("method", "igia")})
    write_json(out, result)
    return result


def _measured_target(c: PlanConfig, model: str, layer_scores: list[float], data: dict, runtime) -> tuple[int, dict]:
    """How many layers a latency or memory target needs, measured on ``model``: (count, what was measured)."""
    import copy

    from gradpruner.measure import targets
    from gradpruner.pruning.surgery import remove_layers

    rt = resolve_runtime(runtime)
    source = resolve_model(model)
    config = check_model(source, rt.trust_remote_code, rt.allow_pickle)
    # a memory target needs shapes only: the model built on the meta device, no weights read
    dense = load_model(source, rt) if c.target_latency is not None else meta_model(config)
    _, _, layers = architectures.find_decoder_layers(dense)
    if len(layers) != len(layer_scores):
        raise GradPrunerError(f"Model {model} has {len(layers)} decoder layers but the scores have {len(layer_scores)}; "
                              "give the model the scores came from.")
    order = sorted(range(len(layers)), key=lambda j: (layer_scores[j], j))[:-1]  # make_plan's removal order
    if c.target_memory is not None:
        itemsize = stored_dtype(config).itemsize
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
               "ratios": {str(n): r for n, r in sorted(ratios.items())}, "runtime": rt.record()}



def _block_order(data: dict) -> list | None:
    return data.get("block_order") or (data.get("variant_statistics") or {}).get("block_order")


def _block_problems(c: PlanConfig, data: dict, scores) -> list[str]:
    """A block plan needs a block search's scores and no layer-only setting; a layer plan cannot use them."""
    order = _block_order(data)
    if c.granularity != "block":
        return [] if order is None else [f"Scores file {scores} comes from a block search (greedy_unit block); plan "
                                         "it with --granularity block."]
    out = [] if order is not None else [f"Scores file {scores} has no block search; score with --method greedy_loss "
                                        "or igia_greedy and --greedy-unit block for --granularity block."]
    if c.merge or c.protect_last or c.max_block is not None or c.target_latency is not None or c.target_memory is not None:
        out.append("--granularity block takes --prune or --target-params only, without --merge, --protect-last, "
                   "--max-block, --target-latency or --target-memory.")
    return out


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
