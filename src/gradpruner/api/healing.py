"""``heal``: fold a map fitted on the dense model's hidden states into the layer before each cut."""

from pathlib import Path

import torch

from gradpruner.api.inputs import read_plan
from gradpruner.data.examples import load_examples, tokenize
from gradpruner.data.tasks import SPLIT_SEED
from gradpruner.errors import Collect, GradPrunerError, lookup
from gradpruner.healing.config import HealConfig
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
from gradpruner.util import options
from gradpruner.util.atomic import atomic_dir, check_output, read_json
from gradpruner.util.versions import versions


def heal(model_dense: str, pruned: str | Path, out: str | Path, plan: str | Path | dict, task: str | None = None,
         data: str | Path | None = None, data_dir: str | Path | None = None, config: HealConfig | None = None, *,
         overwrite: bool = False, runtime=None, **settings) -> dict:
    """Heal a pruned model against its dense original and save a standard checkpoint with heal.json to ``out``.

    The settings are the fields of ``HealConfig`` (``rule``, ``objective``, ``tokens``, ``alpha``,
    ``calib_examples``, …): pass ``config`` or any of them as keywords. ``plan`` is the plan that made
    ``pruned`` from ``model_dense``; ``rule`` must be given (lstsq or trained: rule none, the default, is
    refused, as it would heal nothing). For every run of removed layers with a kept layer before it, a
    linear map fitted on task training examples is folded into that layer's down_proj (ReplaceMe; see
    ``healing.rules``); heal.json records each cut's hidden-state error and the held-out loss before and after.
    Both models run on ``runtime``'s device (default auto): the dense one in its dtype (forward passes
    only), the pruned one, whose weights are fitted, in float32.
    """
    from gradpruner.healing.config import config_problems
    from gradpruner.healing.heal import heal_model, make_batches, split_features
    from gradpruner.healing.rules import HEAL_RULES
    from gradpruner.models.loading import save_model

    c = options.settings(HealConfig, config, settings, "heal setting")
    with Collect() as check:  # every problem with the inputs, in one message, before any work
        check(lookup, HEAL_RULES, c.rule, "heal rule")
        if c.rule == "none":  # the default, which in a run config means no heal stage: here nothing would be healed
            check.problems.append("Healing needs a rule: pass --rule lstsq (the closed-form fold) or --rule trained "
                                  "(lstsq, then AdamW on the folds); rule none would write the pruned model unchanged.")
        check.problems.extend(config_problems(c))
        rt = check(resolve_runtime, runtime)
        trust, pickle = (rt.trust_remote_code, rt.allow_pickle) if rt is not None else (False, False)
        dense = check(resolve_model, model_dense)
        dense_config = check(check_model, dense, trust, pickle) if dense is not None else None
        small = check(resolve_model, pruned)
        small_config = check(check_model, small, trust, pickle) if small is not None else None
        raw_plan = plan if isinstance(plan, dict) else check(read_plan, plan)
        the_plan = None if raw_plan is None else check(
            planning.validate_plan, raw_plan, dense_config.num_hidden_layers if dense_config is not None else None)
        if the_plan is not None and small_config is not None and dense_config is not None:
            check(_check_heal_plan, the_plan, dense, small, dense_config, small_config)
        inputs = tuple(p for p in (dense, small) if isinstance(p, Path))
        check(check_output, out, overwrite, inputs=inputs)
        examples = check(load_examples, task=task, data=data, split="train", data_dir=data_dir, seed=SPLIT_SEED)
    dense_model = load_model(dense, rt)
    small_model = load_model(small, rt, dtype=torch.float32)  # the weights a heal rule fits
    tok = load_tokenizer(small, rt.trust_remote_code)
    fit, held = split_features(tokenize(examples, tok, max_length=c.max_length), c.calib_examples, c.heldout_examples)
    device = rt.device
    report = heal_model(dense_model, small_model, the_plan["keep"], make_batches(fit, tok.pad_token_id, c.batch_size, device),
                        make_batches(held, tok.pad_token_id, c.batch_size, device), c)
    del dense_model
    report.update({"model": str(dense), "base_model": base_model(model_dense), "pruned": str(small), "task": task,
                   "data": str(data) if data else None,
                   "plan": {k: the_plan[k] for k in ("num_layers", "keep", "drop")},
                   "runtime": {**rt.record(), "pruned_dtype": "float32"}, "versions": versions()})
    extra = {"heal.json": report}
    if isinstance(small, Path) and (small / "gradpruner.json").is_file():
        extra["gradpruner.json"] = read_json(small / "gradpruner.json", "Prune record")
    dtype = stored_dtype(small_config)
    if dtype != torch.float32:
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
    if the_plan.get("mlp_from"):
        raise GradPrunerError("The plan moves MLP blocks between layers (plan --granularity block); healing folds a map "
                              "across whole removed layers, so heal a layer plan, or prune without healing.")
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
