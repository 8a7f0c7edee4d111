"""``prune``: the plan applied to the model (in memory or streamed), optionally healed in the same call."""

from pathlib import Path

from gradpruner.api.healing import heal
from gradpruner.api.inputs import read_plan
from gradpruner.data.examples import load_examples
from gradpruner.data.tasks import SPLIT_SEED
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.healing.config import HealConfig
from gradpruner.models.card import write_card
from gradpruner.models.loading import (
    base_model,
    check_model,
    load_model,
    load_tokenizer,
    resolve_model,
    stored_dtype,
)
from gradpruner.models.runtime import resolve as resolve_runtime
from gradpruner.planning import plans as planning
from gradpruner.pruning.config import PruneConfig
from gradpruner.util import options
from gradpruner.util.atomic import atomic_dir, check_output, write_json
from gradpruner.util.versions import versions


def prune(model: str, plan: str | Path | dict, out: str | Path, igia: str | Path | None = None,
          config: PruneConfig | None = None, *, heal: str | HealConfig | None = None, task: str | None = None,
          data: str | Path | None = None, data_dir: str | Path | None = None, overwrite: bool = False,
          runtime=None, **settings) -> dict:
    """Merge, remove layers and save a standard checkpoint to ``out``.

    ``heal`` (a heal rule's name, or a ``HealConfig``) other than ``none`` heals the pruned model in the
    same call on ``task``/``data`` (see ``heal``): ``out`` then holds the healed checkpoint, the result
    gets its heal.json record under ``"heal"``, and the unhealed one is not kept.

    The settings are the fields of ``PruneConfig`` (``density``, ``merge_rule``, ``out_of_core``,
    ``max_shard_size``): pass ``config`` or any of them as keywords. ``out_of_core`` True streams the
    checkpoint shard by shard without loading the model (``pruning.streamed``; output shards of at
    most ``max_shard_size``), False loads it, None (the default) streams whenever the input allows it
    (a local safetensors folder with the model's own tensor names, no hidden-size pruning). Both
    write the same tensors. In memory, the model is held on ``runtime``'s device (default auto) in the
    checkpoint's own dtype: pruning never changes a checkpoint's precision."""
    c = options.settings(PruneConfig, config, settings, "prune setting")
    healing = heal if isinstance(heal, HealConfig) or heal is None else HealConfig(rule=heal)
    if healing is not None and healing.rule != "none":
        return _prune_and_heal(model, plan, out, igia, c, healing, task=task, data=data, data_dir=data_dir,
                               overwrite=overwrite, runtime=runtime)
    density, merge_rule, out_of_core, max_shard_size = c.density, c.merge_rule, c.out_of_core, c.max_shard_size
    from gradpruner.models.loading import save_model
    from gradpruner.pruning.merging import MERGE_RULES, check_density, needs_igia
    from gradpruner.pruning.streamed import parse_size

    with Collect() as check:  # every problem with the inputs, in one message, before any work
        check(lookup, MERGE_RULES, merge_rule, "merge rule")
        check(check_density, density)
        shard_bytes = check(parse_size, max_shard_size)
        rt = check(resolve_runtime, runtime)
        source = check(resolve_model, model)
        raw_plan = plan if isinstance(plan, dict) else check(read_plan, plan)
        model_config = check(check_model, source, rt.trust_remote_code, rt.allow_pickle) \
            if source is not None and rt is not None else None
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
    meta["runtime"] = rt.record()
    model_obj, tok, meta["merge_stats"] = _prune_in_memory(source, model_config, the_plan, factors, density, merge_rule,
                                                           rt)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model(model_obj, tok, tmp, extra_files={"gradpruner.json": meta})
    return meta


def _prune_and_heal(model, plan, out, igia, config: PruneConfig, healing: HealConfig, *, task, data, data_dir,
                    overwrite: bool, runtime) -> dict:
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
        meta = prune(model, plan, Path(tmp) / "pruned", igia, config, runtime=runtime)
        meta["heal"] = heal(model, Path(tmp) / "pruned", out, plan, task=task, data=data, data_dir=data_dir,
                            config=healing, overwrite=overwrite, runtime=runtime)
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


def _prune_in_memory(source, config, the_plan: dict, factors, density: float, merge_rule: str, rt):
    from gradpruner.pruning.merging import merge_layers
    from gradpruner.pruning.surgery import move_mlp_blocks, remove_layers

    model_obj = load_model(source, rt, dtype=stored_dtype(config))
    tok = load_tokenizer(source, rt.trust_remote_code)
    stats = merge_layers(model_obj, the_plan["merge"], factors, density, merge_rule) if the_plan["merge"] else {}
    move_mlp_blocks(model_obj, the_plan.get("mlp_from") or {})
    remove_layers(model_obj, the_plan["keep"])
    if the_plan.get("hidden") is not None:
        from gradpruner.pruning.width import prune_width, validate_width

        prune_width(model_obj, validate_width(the_plan["hidden"], model_obj.config))
    return model_obj, tok, stats



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
