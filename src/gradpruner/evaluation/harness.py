"""lm-evaluation-harness as a client: any harness task, on any model folder gradpruner wrote.

``run_harness`` hands the folder to the harness exactly as a user would (``--model hf``,
``pretrained=<folder>``), so a pruned checkpoint is checked by the harness's own loading, prompts and
metrics. Tasks beyond the harness's own come from YAML files in ``include`` (the harness's
``--include_path``), e.g. a task over local files for a machine without the Hub.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from gradpruner.errors import GradPrunerError
from gradpruner.models.runtime import resolve


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise GradPrunerError("--harness needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13,<0.5' "
                              "(or pip install 'gradpruner[test]').") from None
    return lm_eval, TaskManager


def run_harness(model: str | Path, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                include: str | Path | None = None, runtime=None, samples: bool = False) -> dict:
    """Evaluate the model folder ``model`` on harness ``tasks``; {"tasks": {task: {metric: value}}, ...}.

    The harness loads the model on ``runtime``'s device in its dtype (a ``RuntimeConfig``, a resolved
    ``Runtime`` or None for auto), and the result records both.

    ``samples`` keeps the harness's per-item responses (log-likelihoods of every choice) under "samples"."""
    lm_eval, TaskManager = _lm_eval()
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise GradPrunerError(f"lm-evaluation-harness has no task {', '.join(map(repr, unknown))}; see `lm_eval ls tasks`, "
                              "or pass --harness-include DIR with the YAML of your own task.")
    if not Path(model).is_dir():
        raise GradPrunerError(f"--harness evaluates a model folder; {model} is not one (save the model first).")
    rt = resolve(runtime)
    res = lm_eval.simple_evaluate(model="hf", model_args=harness_model_args(model, rt), tasks=list(tasks),
                                  limit=limit, batch_size=batch_size, device=str(rt.device),
                                  task_manager=manager, log_samples=samples)
    out = {"harness": f"lm-evaluation-harness {lm_eval.__version__}", "model": str(model), "limit": limit,
           "runtime": rt.record(),
           "tasks": {t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"
                         and not (isinstance(v, float) and math.isnan(v))}
                     for t, m in res["results"].items()}}
    if samples:
        out["samples"] = {t: [{"doc_id": s["doc_id"], "loglikelihoods": [float(r[0][0]) for r in s["resps"]]}
                              for s in rows] for t, rows in res["samples"].items()}
    return out


def harness_model_args(model: str | Path, rt) -> dict:
    """The harness's ``hf`` model arguments for a resolved runtime: the same precision, trust and kernel."""
    args = {"pretrained": str(model), "dtype": rt.dtype_name, "trust_remote_code": rt.trust_remote_code}
    if rt.attn_implementation:
        args["attn_implementation"] = rt.attn_implementation
    return args


def format_harness(res: dict) -> str:
    return "\n".join(f"{task}: " + ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items() if k != "alias")
                     for task, metrics in res["tasks"].items())


def save_harness(res: dict, out: str | Path) -> None:
    from gradpruner.util.atomic import write_json

    write_json(Path(out), json.loads(json.dumps(res, default=str)))
