"""``gradpruner run``: dense fine-tune → score → plan → prune (→ heal) → fine-tune → evaluate → report.

Every stage writes its files into the run folder and a record ``stages/<name>.json`` holding a key
(a hash of the config that stage depends on, chained through the stages it reads from), its wall
time and peak memory. A stage whose record and outputs exist with the same key is skipped, so a
rerun resumes where an interrupted run stopped and a changed key reruns exactly what it affects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import fields
from pathlib import Path

from gradpruner import api
from gradpruner.data.tasks import SPLIT_SEED
from gradpruner.measure.costs import flops_per_token, latency, measure, param_counts
from gradpruner.models.card import add_results
from gradpruner.models.runtime import resolve as resolve_runtime
from gradpruner.pipeline.config import RunConfig, dump_config, section_dict
from gradpruner.pipeline.isolate import in_child
from gradpruner.pruning.merging import needs_igia
from gradpruner.scoring.variants import needs_target
from gradpruner.util.atomic import atomic_file, read_json, write_json

log = logging.getLogger(__name__)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Config keys added after stage keys were first published: keyed only when set away from their
# default, so finished stages of earlier run folders (and of earlier versions) stay valid.
LATER = {"score": {"method": "igia", "adapter": "lora", "calib_examples": 64, "laco_group": 4, "laco_threshold": 0.65,
                   "steps_fraction": None, "planned_steps": None, "lora_dropout": 0.0, "max_grad_norm": 0.0,
                   "greedy_pool": "all", "greedy_pool_factor": 2.0, "greedy_unit": "layer"},
         "plan": {"granularity": "layer", "protect_last": 0, "max_block": None, "target_latency": None,
                  "latency": "prefill", "target_memory": None},
         "prune": {"out_of_core": None, "max_shard_size": "2GB"},
         "finetune": {"distill": None, "distill_alpha": 0.5, "distill_temperature": 1.0, "lora_dropout": 0.05,
                      "warmup_ratio": 0.03, "lr_scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0,
                      "save_steps": 50, "logging_steps": 10, "train_last": 3, "train_head": False,
                      "distill_cache": True, "distill_top_k": 64},
         "eval": {"metric": None, "max_new_tokens": None, "max_length": 2048}}
DISTILL_KEYS = ("distill", "distill_alpha", "distill_temperature", "distill_cache", "distill_top_k")  # pruned fine-tune only
LAST_LAYERS_KEYS = ("train_last", "train_head")  # mode last_layers only


def _finetune_keyed(ft: dict, f) -> dict:
    """The fine-tune section's keyed settings: ``train_last``/``train_head`` only in mode last_layers;
    the teacher cache only when distilling, and then as it computes. A cached run is keyed
    ``distill_cache: true`` with its ``distill_top_k``; the online teacher (``distill_cache: false``)
    keeps the key that distilled runs had before the cache existed."""
    ft = {k: v for k, v in ft.items() if k not in ("distill_cache", "distill_top_k")
          and (f.mode == "last_layers" or k not in LAST_LAYERS_KEYS)}
    if f.distill is not None and f.distill_cache:
        ft.update(distill_cache=True, distill_top_k=f.distill_top_k)
    return ft


def _section(name: str, obj) -> dict:
    d = {k: v for k, v in section_dict(obj).items() if LATER.get(name, {}).get(k, object()) != v}
    if name == "plan":  # keyed under its earlier name; None (the method's own scores) as "igia", the only method before
        d["rule"] = d.pop("from_method") or "igia"
    return d


class Run:
    """The run folder, its stage records and the chain of stage keys."""

    def __init__(self, cfg: RunConfig, echo=print, isolate: bool = True, store: str | Path | None = None,
                 reuse: list[str | Path] = ()):
        self.cfg, self.echo, self.isolate = cfg, echo, isolate
        self.store = Path(store) if store is not None else None
        self.reuse = [Path(p) for p in reuse]
        self.dir = Path(cfg.out)
        self.stages_dir = self.dir / "stages"
        self.requires: dict[str, list[str]] = {}  # stage -> more outputs it counts as done only with
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        data = {"model": cfg.model, "task": cfg.task, "data": cfg.data, "eval_data": cfg.eval_data,
                "data_dir": cfg.data_dir, "seed": cfg.seed}
        precision = resolve_runtime(cfg.runtime).dtype_name  # where a stage runs changes its numbers through the
        if precision != "float32":                           # precision; float32 keys stay as they were
            data["precision"] = precision
        self.keys = {"data": _key(data)}
        # LaCo's scores depend on how many layers it must collapse
        laco = [cfg.plan.prune, "laco-2"] if cfg.score.method == "laco" else []
        if needs_target(cfg.score.method):  # a guarded variant's pool depends on how many layers go
            laco = [cfg.plan.prune, "pool"]
        self.keys["score"] = _key(self.keys["data"], _section("score", cfg.score), *laco)
        self.keys["plan"] = _key(self.keys["score"], _section("plan", cfg.plan))
        self.keys["prune"] = _key(self.keys["plan"], _section("prune", cfg.prune))
        pruned = "prune"  # the stage whose model the pruned fine-tune and eval start from
        if cfg.heal.rule != "none":  # no heal stage, and every key as before, while heal.rule is none
            self.keys["heal"] = _key(self.keys["prune"], _section("heal", cfg.heal))
            pruned = "heal"
        ft = _finetune_keyed({k: v for k, v in _section("finetune", cfg.finetune).items() if k != "dense_baseline"},
                             cfg.finetune)
        self.keys["dense_ft"] = _key(self.keys["data"], {k: v for k, v in ft.items() if k not in DISTILL_KEYS})
        teacher = [self.keys["dense_ft"]] if cfg.finetune.distill == "dense_ft" else []
        self.keys["pruned_ft"] = _key(self.keys[pruned], ft, *teacher)
        ev = section_dict(cfg.eval)
        later = {k: v for k, v in _section("eval", cfg.eval).items() if k in LATER["eval"]}  # keyed only when set
        for name, upstream in (("dense_zero_shot", "data"), ("dense_ft", "dense_ft"), ("pruned", pruned),
                               ("pruned_ft", "pruned_ft")):
            offset = [ev["offset"]] if ev["offset"] else []  # 0 leaves earlier keys unchanged
            self.keys[f"eval_{name}"] = _key(self.keys[upstream], ev["limit"], ev["encoder"], "eval", *offset,
                                                  *([later] if later else []))

    def place(self, stage: str, rel: str) -> Path:
        """Where ``stage`` writes ``rel``: the run folder, or with a store (``gradpruner compare``) a
        folder named by the stage's key that every run with the same key shares; the run folder then
        holds a symlink to it."""
        if self.store is None:
            return self.dir / rel
        return self.store / f"{stage}-{self.keys[stage]}" / rel

    def record(self, stage: str) -> Path:
        if self.store is None:
            return self.stages_dir / f"{stage}.json"
        return self.store / f"{stage}-{self.keys[stage]}.json"

    def _link(self, stage: str, rels: list[str]) -> None:
        """Make the run folder show a stored stage's outputs and record (no-op without a store)."""
        if self.store is None:
            return
        for rel in rels:
            target, here = self.place(stage, rel), self.dir / rel
            if not target.exists():
                continue
            here.parent.mkdir(parents=True, exist_ok=True)
            if here.is_symlink() or here.is_file():
                here.unlink()
            elif here.is_dir():
                shutil.rmtree(here)
            here.symlink_to(os.path.relpath(target, here.parent))
        write_json(self.stages_dir / f"{stage}.json", read_json(self.record(stage), "Stage record"))

    def _adopt(self, stage: str, rels: list[str]) -> bool:
        """Take a finished stage with the same key from an earlier run folder (``reuse``) into the store."""
        for folder in self.reuse if self.store is not None else ():
            rec = folder / "stages" / f"{stage}.json"
            try:
                data = json.loads(rec.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("key") != self.keys[stage] or not all((folder / rel).exists()
                                                                for rel in [rels[0], *self.requires.get(stage, ())]):
                continue
            for rel in rels:
                if (folder / rel).exists():
                    dest = self.place(stage, rel)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    if not dest.exists():  # relative, so a copy of the whole results tree still resolves
                        dest.symlink_to(os.path.relpath((folder / rel).resolve(), dest.parent.resolve()))
            write_json(self.record(stage), data)
            self.echo(f"  ✓ {stage}: reused from {folder}")
            return True
        return False

    def done(self, stage: str, outputs: list[Path]) -> bool:
        rec = self.record(stage)
        if not rec.is_file() or not all(p.exists() for p in outputs):
            return False
        try:
            return json.loads(rec.read_text()).get("key") == self.keys[stage]
        except (json.JSONDecodeError, OSError):
            return False

    def finished(self, stage: str, rels: list[str]) -> bool:
        """Whether ``stage`` is recorded with this key and its first output exists, and the outputs in
        ``requires`` (files a later stage reads that results are committed without) too."""
        return self.done(stage, [self.place(stage, rel) for rel in [rels[0], *self.requires.get(stage, ())]])

    def show(self, stage: str, rels: list[str]) -> None:
        """A stage nothing needs now: show its record (and whatever outputs exist) in the run folder."""
        if self.done(stage, []):  # recorded with this key, whether or not its outputs are here
            self._link(stage, rels)
        self.echo(f"  ✓ {stage}: not needed, every stage reading it is done")

    def stage(self, stage: str, rels: list[str], fn, *args, **kwargs):
        """Run ``fn`` unless the stage is done; record its key, usage and result.

        ``rels`` are the stage's outputs relative to the run folder; the first must exist for the
        stage to count as done. ``fn``'s arguments name the paths from ``place``."""
        if self.finished(stage, rels) or self._adopt(stage, rels):
            self.echo(f"  ✓ {stage}: up to date, skipped" + (" (shared)" if self.store else ""))
            self._link(stage, rels)
            return read_json(self.record(stage), "Stage record").get("result")
        self.echo(f"  → {stage}")
        started = self.record(stage).with_suffix(".started.json")
        fresh = not started.is_file() or json.loads(started.read_text()).get("key") != self.keys[stage]
        write_json(started, {"key": self.keys[stage]})
        if self.isolate:
            result, usage = in_child(fn, args, {**kwargs, "fresh": fresh}, self.stages_dir / f".{stage}.result.json")
        else:
            with measure() as u:
                result = fn(*args, fresh=fresh, **kwargs)
            usage = u.as_dict()
        write_json(self.record(stage), {"key": self.keys[stage], "usage": usage, "result": result})
        started.unlink(missing_ok=True)
        self._link(stage, rels)
        self.echo(f"    {stage}: {usage['seconds']:.0f} s, peak RSS {usage['peak_rss_mb']:.0f} MiB")
        return result


# --- stages -----------------------------------------------------------------------------------

def _data_args(cfg: RunConfig) -> dict:
    return {"task": cfg.task, "data": cfg.data, "data_dir": cfg.data_dir}


def _finetune(cfg: RunConfig, model: str, out: Path, teacher: str | None = None, fresh: bool = True) -> dict:
    from gradpruner.finetuning.finetune import FinetuneConfig, finetune

    names = {f.name for f in fields(FinetuneConfig)}
    ft = FinetuneConfig(**{k: v for k, v in section_dict(cfg.finetune).items() if k in names}, seed=cfg.seed,
                        distill_from=teacher)
    if fresh:  # checkpoints from another config must not be resumed
        shutil.rmtree(out.with_name(out.name + ".checkpoints"), ignore_errors=True)
    rec = finetune(model, out, **_data_args(cfg), config=ft, resume=not fresh, overwrite=True, runtime=cfg.runtime)
    write_json(out.with_name(f"{out.name}_finetune.json"), rec)  # the loss curve, kept beside the checkpoint
    return {k: rec.get(k) for k in ("optimizer_steps", "train_examples", "wall_seconds", "peak_rss_mib", "final_loss",
                                    "trainable_params")}


def _score(cfg: RunConfig, out: Path, fresh: bool) -> dict:
    s = cfg.score
    res = api.score(cfg.model, out, **_data_args(cfg), config=s, seed=cfg.seed, target=cfg.plan.prune, overwrite=True,
                    runtime=cfg.runtime)
    return {"method": s.method, "steps": res["steps"], "informative_steps": res.get("informative_steps")}


def _plan(cfg: RunConfig, scores: Path, out: Path, fresh: bool) -> dict:
    res = api.plan(scores, out, config=cfg.plan, model=cfg.model, overwrite=True, runtime=cfg.runtime)
    return {"keep": res["keep"], "drop": res["drop"], "merge": res["merge"]}


def _prune(cfg: RunConfig, plan: Path, out: Path, fresh: bool) -> dict:
    api.prune(cfg.model, plan, out, config=cfg.prune, overwrite=True, runtime=cfg.runtime)
    return {"out": str(out)}


def _heal(cfg: RunConfig, plan: Path, pruned: Path, out: Path, fresh: bool) -> dict:
    res = api.heal(cfg.model, pruned, out, plan, **_data_args(cfg), config=cfg.heal, overwrite=True,
                   runtime=cfg.runtime)
    return {"rule": res["rule"], "loss": res["loss"],
            "errors": [[c["error_before"], c["error_after"]] for c in res["cuts"]]}


def _evaluate(cfg: RunConfig, model: str, out: Path, fresh: bool) -> dict:
    from gradpruner.evaluation.config import EvalConfig
    from gradpruner.evaluation.evaluate import evaluate
    from gradpruner.models.loading import load_model, load_tokenizer, resolve_model

    source = resolve_model(model)
    m, tok = load_model(source, cfg.runtime), load_tokenizer(source, cfg.runtime.trust_remote_code)
    res = evaluate(m, tok, task=cfg.task, data=cfg.eval_data, train_data=cfg.data, data_dir=cfg.data_dir,
                   seed=SPLIT_SEED, config=EvalConfig(**{f.name: getattr(cfg.eval, f.name) for f in fields(EvalConfig)}),
                   item_scores=True, progress=True)  # one score per item, for paired intervals in compare
    res.update({"model": str(model), "params": param_counts(m), "flops_per_token": flops_per_token(m),
                "latency": latency(m)})
    write_json(out, res)
    return {"metric": res["metric"], "value": res["value"], "n": res["n"]}


def needed_stages(reads: dict[str, tuple[str, ...]], finished, need: tuple[str, ...] = ()) -> set[str]:
    """The stages a run must run (or find up to date): every final stage (one nothing reads) that is
    not finished, the stages in ``need``, and what they read, transitively. A finished final stage needs nothing, so a run whose
    evaluations are recorded does not rebuild the models they evaluated (results are kept without
    their checkpoints)."""
    read_by = {s for inputs in reads.values() for s in inputs}
    todo = [s for s in reads if s not in read_by and not finished(s)] + [s for s in need if s in reads]
    needed: set[str] = set()
    while todo:
        s = todo.pop()
        if s not in needed:
            needed.add(s)
            todo.extend(reads.get(s, ()))
    return needed


def score_stage(r: Run) -> Path:
    """Run (or reuse) the score stage of ``r``; the path of its scores.json."""
    r.stage("score", ["scores"], _score, r.cfg, r.place("score", "scores"))
    return r.place("score", "scores/scores.json")


def dense_stage(r: Run) -> Path:
    """Run (or reuse) the dense fine-tune of ``r``; the path of the fine-tuned model."""
    r.stage("dense_ft", ["dense_ft", "dense_ft_finetune.json"], _finetune, r.cfg, r.cfg.model, r.place("dense_ft", "dense_ft"))
    return r.place("dense_ft", "dense_ft")


def eval_stage(r: Run, name: str, model: str) -> Path:
    """Run (or reuse) the evaluation ``eval_<name>`` of ``model``; the path of its result file."""
    rel = f"eval/{name}.json"
    r.stage(f"eval_{name}", [rel], _evaluate, r.cfg, model, r.place(f"eval_{name}", rel))
    return r.place(f"eval_{name}", rel)


def preflight(cfg: RunConfig) -> None:
    """Check the model, the data files and the run folder before any stage starts, reporting every
    problem at once (the config's own keys were checked when it was read)."""
    from gradpruner.data.examples import load_examples, load_jsonl, require_file
    from gradpruner.errors import Collect
    from gradpruner.evaluation.evaluate import check_disjoint
    from gradpruner.models.loading import check_model, resolve_model
    from gradpruner.util.atomic import check_output

    with Collect() as check:
        source = check(resolve_model, cfg.model)
        if source is not None:
            check(check_model, source)
        train = check(load_examples, task=cfg.task, data=cfg.data, split="train", data_dir=cfg.data_dir, seed=SPLIT_SEED)
        if cfg.eval_data is not None and cfg.task is not None:
            check(require_file, Path(cfg.eval_data), "Config key eval_data: file", "give an existing JSONL file")
        elif cfg.eval_data is not None:  # held-out prompt/completion lines: none may be a training line
            held_out = check(load_jsonl, cfg.eval_data)
            if train is not None and held_out is not None:
                check(check_disjoint, train, held_out, str(cfg.eval_data))
        check(check_output, cfg.out, True, inputs=(source if isinstance(source, Path) else None,))


def run(cfg: RunConfig, echo=print, isolate: bool = True, store: str | Path | None = None,
        reuse: list[str | Path] = (), checked: bool = False, need: tuple[str, ...] = ()) -> Path:
    """Run every stage that is not up to date and that an unfinished evaluation (or a stage named in
    ``need``) reads; return the report path. ``checked``: the caller has already run
    ``preflight(cfg)`` (``compare`` checks each distinct model and data source once).

    With ``isolate`` (the default) each stage runs in its own process, so the peak memory recorded
    for a stage is that stage's alone and memory does not accumulate across stages. With ``store``
    (used by ``gradpruner compare``) stage outputs live in that folder under their keys, so runs
    that share a stage's inputs (the dense fine-tune, the scores) compute it once; ``reuse`` names
    earlier run folders whose finished stages with the same key are taken instead of recomputed.
    """
    from gradpruner.report.run_report import write_report

    if not checked:
        preflight(cfg)
    r = Run(cfg, echo, isolate, store, reuse)
    d, at = r.dir, r.place
    with atomic_file(d / "config.yaml") as fh:
        fh.write(dump_config(cfg))
    echo(f"run folder {d}")
    pruned_stage = "heal" if cfg.heal.rule != "none" else "prune"  # the healed model takes the pruned one's place
    pruned = at(pruned_stage, "healed" if pruned_stage == "heal" else "pruned")
    teacher = {"dense_ft": str(at("dense_ft", "dense_ft")), "dense": cfg.model}.get(cfg.finetune.distill)
    models = {"dense_zero_shot": cfg.model if cfg.eval.zero_shot_dense else None,
              "dense_ft": str(at("dense_ft", "dense_ft")) if cfg.finetune.dense_baseline else None,
              "pruned": str(pruned) if cfg.eval.pruned_no_finetune else None,
              "pruned_ft": str(at("pruned_ft", "pruned_ft"))}
    # (stage, outputs, function, arguments, stages it reads), in the order they run
    steps = [("dense_ft", ["dense_ft", "dense_ft_finetune.json"], _finetune, (cfg, cfg.model, at("dense_ft", "dense_ft")), ())
             ] if cfg.finetune.dense_baseline else []
    steps += [("score", ["scores"], _score, (cfg, at("score", "scores")), ()),
              ("plan", ["plan.json"], _plan, (cfg, at("score", "scores/scores.json"), at("plan", "plan.json")), ("score",)),
              ("prune", ["pruned"], _prune, (cfg, at("plan", "plan.json"), at("prune", "pruned")), ("plan",))]
    if pruned_stage == "heal":
        steps.append(("heal", ["healed"], _heal, (cfg, at("plan", "plan.json"), at("prune", "pruned"), pruned),
                      ("plan", "prune")))
    steps.append(("pruned_ft", ["pruned_ft", "pruned_ft_finetune.json"], _finetune,
                  (cfg, str(pruned), at("pruned_ft", "pruned_ft"), teacher),
                  (pruned_stage,) + (("dense_ft",) if cfg.finetune.distill == "dense_ft" else ())))
    reads = {"dense_zero_shot": (), "dense_ft": ("dense_ft",), "pruned": (pruned_stage,), "pruned_ft": ("pruned_ft",)}
    for name, model in models.items():
        if model is not None:
            rel = f"eval/{name}.json"
            steps.append((f"eval_{name}", [rel], _evaluate, (cfg, model, at(f"eval_{name}", rel)), reads[name]))
    if cfg.plan.merge and needs_igia(cfg.prune.merge_rule):  # the merges read the factors beside the scores
        r.requires["score"] = ["scores/igia.safetensors"]
    outputs = {s: rels for s, rels, *_ in steps}
    needed = needed_stages({s: i for s, _, _, _, i in steps}, lambda s: r.finished(s, outputs[s]), need)
    for stage, rels, fn, args, _ in steps:
        if stage in needed:
            r.stage(stage, rels, fn, *args)
        else:
            r.show(stage, rels)
    labels = {"pruned_ft": "this model (pruned, fine-tuned)", "pruned": "pruned, before fine-tuning",
              "dense_ft": "dense, fine-tuned alike", "dense_zero_shot": "dense, before fine-tuning"}
    if at("pruned_ft", "pruned_ft").is_dir():  # absent when only its evaluation was kept (results without checkpoints)
        add_results(at("pruned_ft", "pruned_ft"), {labels[n]: read_json(at(f"eval_{n}", f"eval/{n}.json"), "Evaluation")
                                                   for n, m in models.items() if m is not None})
    report = write_report(d)
    echo(f"report: {report} (and {report.with_suffix('.html').name})")
    return report
