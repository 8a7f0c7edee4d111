"""``gradpruner search``: how many layers can go while the task still works?

The answer to the paper's Eq. 1 for one model and task: the largest removal whose validation metric
(``max_drop``, absolute) or held-out loss (``max_loss``, ratio) stays within a tolerance of the dense
model's, the dense model fine-tuned exactly like the pruned one. Two phases over k, the layers removed:

1. **Before fine-tuning** (cheap, seconds a point): the method scores the model once; for k = min_prune,
   min_prune + step, …, max_prune the plan's layers are cut from a copy of the model and the validation
   slice measured (metric with one score per item, completion loss, parameters, latency).
2. **Fine-tuned** (minutes a point): a binary search over k, each probe a whole pipeline run (score,
   plan, prune, heal, fine-tune, evaluate) whose stages live in the keyed store that ``compare`` uses.
   The first probe is the largest k that phase 1 puts within tolerance; each later one halves the range
   between the largest k known to pass and the smallest known to fail; at most ``finetune_points`` probes.

Every point is a file in the store named by the key of what it depends on, so a second search with another
tolerance or budget recomputes nothing it already has. The recommendation is the largest fine-tuned k within
tolerance, with the paired bootstrap 95% interval of its drop (``evaluation.stats``), and says how sure it is.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from gradpruner.errors import Collect, GradPrunerError
from gradpruner.evaluation.stats import paired_bootstrap, paired_scores
from gradpruner.pipeline.config import BUDGETS, RunConfig
from gradpruner.pipeline.run import (
    Run,
    dense_stage,
    eval_stage,
    preflight,
    run,
    score_stage,
)
from gradpruner.report.search_report import write_search_outputs
from gradpruner.util.atomic import read_json, write_json

MIN_ITEMS_PER_TOLERANCE = 5  # a tolerated drop must amount to at least this many items of the slice


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def search_problems(cfg: RunConfig, num_layers: int | None = None, heldout: int | None = None) -> list[str]:
    """Everything wrong with the search settings, in one list (empty: fine)."""
    s, out = cfg.search, []
    if (s.max_drop is None) == (s.max_loss is None):
        out.append("Give exactly one tolerance: --max-drop (e.g. 0.02, the metric's accepted drop) or --max-loss "
                   "(e.g. 1.05, the accepted held-out loss ratio).")
    if s.max_drop is not None and not 0 <= s.max_drop <= 1:
        out.append(f"--max-drop {s.max_drop} is not a drop of a metric between 0 and 1; give e.g. 0.02 for two points.")
    if s.max_loss is not None and not s.max_loss >= 1:
        out.append(f"--max-loss {s.max_loss} is below 1, which no pruned model can be asked for; give e.g. 1.05.")
    if s.budget not in BUDGETS:
        out.append(f"--budget {s.budget!r} does not exist; use {', '.join(BUDGETS)}.")
    if s.latency not in ("prefill", "decode"):
        out.append(f"--latency {s.latency!r}: use prefill or decode.")
    for name in ("val_items", "min_prune", "step", "finetune_points"):
        if getattr(s, name) < 1:
            out.append(f"search.{name} is {getattr(s, name)}; give a whole number ≥ 1.")
    if s.finetune_steps is not None and s.finetune_steps < 1:
        out.append(f"search.finetune_steps is {s.finetune_steps}; give a number of steps ≥ 1, or leave it empty.")
    if num_layers is not None and s.min_prune >= 1:
        top = s.max_prune if s.max_prune is not None else num_layers // 2
        if not s.min_prune <= top <= num_layers - 1:
            out.append(f"The search range {s.min_prune}..{top} does not fit the model's {num_layers} layers; give "
                       f"1 ≤ min_prune ≤ max_prune ≤ {num_layers - 1}.")
    if heldout is not None and s.val_items >= 1:
        if s.val_items > heldout:
            out.append(f"The task has {heldout} held-out items, fewer than the validation slice of {s.val_items}; "
                       "lower --val-items or evaluate on a larger held-out file.")
        elif s.max_drop is not None and s.max_drop > 0 and s.val_items * s.max_drop < MIN_ITEMS_PER_TOLERANCE:
            need = -(-MIN_ITEMS_PER_TOLERANCE // s.max_drop) if s.max_drop >= 0.01 else MIN_ITEMS_PER_TOLERANCE / s.max_drop
            out.append(f"A drop of {s.max_drop} is {s.val_items * s.max_drop:.1f} of the {s.val_items} validation items, "
                       f"too few to measure; give at least {int(need)} items (--val-items, the task has {heldout}) "
                       "or a larger --max-drop.")
    return out


def _point_config(cfg: RunConfig, k: int, out: Path, offset: int) -> RunConfig:
    """The run of one fine-tuned point: the search's fine-tune budget, the validation slice, no extra evaluations."""
    c = copy.deepcopy(cfg)
    c.out = str(out)
    c.plan = dataclasses.replace(c.plan, prune=k, target_params=None, target_latency=None, target_memory=None)
    steps = cfg.search.finetune_steps
    c.finetune = dataclasses.replace(c.finetune, dense_baseline=True,
                                     **({"max_steps": steps} if steps is not None else {}))
    c.eval = dataclasses.replace(c.eval, offset=offset, limit=cfg.search.val_items, zero_shot_dense=False,
                                 pruned_no_finetune=False)
    return c


class Search:
    """The store, the validation slice and the measured points of one search."""

    def __init__(self, cfg: RunConfig, echo=print, isolate: bool = True):
        from gradpruner.evaluation.evaluate import heldout_examples

        self.cfg, self.echo, self.s, self.isolate = cfg, echo, cfg.search, isolate
        self.out = Path(cfg.out)
        self.store = Path(self.s.store) if self.s.store else self.out / "store"
        self.examples = heldout_examples(cfg.task, cfg.eval_data, cfg.data_dir)
        self.offset = len(self.examples) - self.s.val_items
        self.slice = {"offset": self.offset, "limit": self.s.val_items, "n_heldout": len(self.examples)}

    # ----------------------------------------------------------------- phase 1: before fine-tuning
    def scores(self, k: int) -> tuple[dict, Path]:
        """The scores that plan ``k`` removals: scored once (at the top of the range) and retargeted when the
        method allows, else scored for ``k`` itself. Stored like ``compare``'s score stage."""
        from gradpruner.scoring.variants import retarget

        top = self.top
        r = Run(_point_config(self.cfg, top, self.out / "scores", self.offset), self.echo, self.isolate, self.store)
        path = score_stage(r)
        sc = read_json(path, "Scores file")
        layer_scores = retarget(sc, k)
        if layer_scores is None and k != top:
            r = Run(_point_config(self.cfg, k, self.out / "scores", self.offset), self.echo, self.isolate, self.store)
            path = score_stage(r)
            sc = read_json(path, "Scores file")
            layer_scores = sc["layer_scores"]
        return {**sc, "layer_scores": layer_scores or sc["layer_scores"]}, path

    def cheap(self, model, tok, k: int) -> dict:
        """One point before fine-tuning (k = 0: the dense model), from the store when it has it."""
        from gradpruner.planning.plans import make_plan

        if k == 0:
            key, plan, scores_path = _digest("dense", self.cfg.model, self.cfg.task, self.cfg.data, self.slice), None, None
        else:
            sc, scores_path = self.scores(k)
            plan = make_plan(sc["layer_scores"], k, self.cfg.plan.merge, protect_last=self.cfg.plan.protect_last,
                             max_block=self.cfg.plan.max_block)
            key = _digest("cheap", read_json(scores_path, "Scores file").get("layer_scores"), plan["keep"],
                          plan["merge"], self.cfg.model, self.cfg.task, self.slice, self.cfg.prune.merge_rule)
        rec = self.store / f"search_cheap-{key}.json"
        if rec.is_file():
            self.echo(f"  ✓ k = {k} before fine-tuning: reused ({rec.name})")
            return read_json(rec, "Search point")
        point = self._measure_cut(model, tok, plan, scores_path)
        point.update({"k": k, "phase": "before_finetune", "key": key})
        write_json(rec, point)
        return point

    def _measure_cut(self, model, tok, plan: dict | None, scores_path: Path | None) -> dict:
        import time

        from gradpruner.measure.costs import latency, param_counts
        from gradpruner.pruning.merging import merge_layers
        from gradpruner.pruning.surgery import remove_layers

        t0 = time.perf_counter()
        small = model if plan is None else copy.deepcopy(model)
        if plan is not None:
            if plan["merge"]:
                factors = scores_path.parent / "igia.safetensors"
                merge_layers(small, plan["merge"], factors, self.cfg.prune.density, self.cfg.prune.merge_rule)
            remove_layers(small, plan["keep"])
        point = {**self._measure(small, tok), "params": param_counts(small)["total"], "latency": latency(small),
                 "removed": plan["drop"] if plan else [], "merge": plan["merge"] if plan else {}}
        point["seconds"] = round(time.perf_counter() - t0, 1)
        return point

    def _measure(self, model, tok) -> dict:
        from gradpruner.evaluation.evaluate import evaluate

        cfg = self.cfg
        res = evaluate(model, tok, task=cfg.task, data=cfg.eval_data, data_dir=cfg.data_dir, offset=self.offset,
                       limit=self.s.val_items, batch_size=cfg.eval.batch_size, metric=cfg.eval.metric,
                       item_scores=True, progress=False)
        return {"task": res["task"], "metric": res["metric"], "higher_is_better": res["higher_is_better"],
                "value": res["value"], "n": res["n"], "item_scores": res.get("item_scores"),
                "loss": self._loss(model, tok)}

    def _loss(self, model, tok) -> float:
        """The completion loss on the validation slice's examples."""
        from gradpruner.data.examples import tokenize
        from gradpruner.evaluation.evaluate import heldout_loss

        feats = tokenize(self.examples[self.offset:], tok, self.cfg.finetune.max_length)
        return heldout_loss(model, tok, feats, self.cfg.eval.batch_size)

    @property
    def top(self) -> int:
        return self.s.max_prune if self.s.max_prune is not None else self.num_layers // 2

    def phase_one(self) -> tuple[dict, list[dict]]:
        from gradpruner.models.architectures import find_decoder_layers
        from gradpruner.models.loading import load_model, load_tokenizer, resolve_model

        source = resolve_model(self.cfg.model)
        model, tok = load_model(source, self.cfg.runtime), load_tokenizer(source, self.cfg.runtime.trust_remote_code)
        self.num_layers = len(find_decoder_layers(model)[2])
        problems = search_problems(self.cfg, self.num_layers, len(self.examples))
        if problems:
            raise GradPrunerError(*problems)
        ks = list(range(self.s.min_prune, self.top + 1, self.s.step))
        ks += [self.top] if ks[-1] != self.top else []
        self.echo(f"before fine-tuning: the dense model and {len(ks)} removals ({ks[0]}..{ks[-1]}), "
                  f"validation items {self.offset}..{self.offset + self.s.val_items - 1}")
        dense = self.cheap(model, tok, 0)
        points = []
        for k in tqdm(ks, desc="search, before fine-tuning", unit="point"):
            points.append(self.cheap(model, tok, k))
        return dense, points

    # ----------------------------------------------------------------- phase 2: fine-tuned points
    def tuned(self, k: int) -> dict:
        """One fine-tuned point (k = 0: the dense model fine-tuned alike) through ``run`` and its store."""
        folder = self.out / "points" / (f"k={k}" if k else "dense")
        cfg = _point_config(self.cfg, max(k, self.s.min_prune), folder, self.offset)
        r = Run(cfg, self.echo, self.isolate, self.store)
        stage = "dense_ft" if k == 0 else "pruned_ft"
        key = r.keys[f"eval_{stage}"]
        rec = self.store / f"search_tuned-{key}.json"
        if rec.is_file():
            self.echo(f"  ✓ k = {k} fine-tuned: reused ({rec.name})")
            return read_json(rec, "Search point")
        if k == 0:
            evaluation = eval_stage(r, "dense_ft", str(dense_stage(r)))
        else:  # the checkpoint too, for the loss, even where the run has its evaluation already
            run(cfg, self.echo, self.isolate, self.store, checked=True, need=("pruned_ft",))
            evaluation = r.place("eval_pruned_ft", "eval/pruned_ft.json")
        point = self._measure_folder(r.place(stage, stage), read_json(evaluation, "Evaluation"))
        spent = ["score", "plan", "prune", "heal", "pruned_ft", "eval_pruned_ft"] if k else ["dense_ft", "eval_dense_ft"]
        point["seconds"] = round(point["seconds"] + sum(
            read_json(r.record(st), "Stage record")["usage"]["seconds"] for st in spent if st in r.keys and r.record(st).is_file()), 1)
        if k:
            plan = read_json(r.place("plan", "plan.json"), "Plan")
            point.update(removed=plan["drop"], merge=plan["merge"])
        point.update({"k": k, "phase": "finetuned", "key": key, "run": str(cfg.out)})
        write_json(rec, point)
        return point

    def _measure_folder(self, folder: Path, evaluation: dict) -> dict:
        """A fine-tuned point: the run's own evaluation of the slice, and the held-out loss measured here."""
        import time

        from gradpruner.models.loading import load_model, load_tokenizer

        t0 = time.perf_counter()
        model, tok = load_model(folder, self.cfg.runtime), load_tokenizer(folder, self.cfg.runtime.trust_remote_code)
        point = {k: evaluation.get(k) for k in ("task", "metric", "higher_is_better", "value", "n", "item_scores")}
        point.update(loss=self._loss(model, tok),
                     params=evaluation["params"]["total"], latency=evaluation["latency"])
        point["seconds"] = round(time.perf_counter() - t0, 1)
        return point


# --------------------------------------------------------------------- judging and the binary search
def judge(point: dict, ref: dict, cfg: RunConfig) -> dict:
    """What a point costs against its reference (the dense model measured alike): the metric's drop with
    its paired bootstrap 95% interval, the loss ratio, and whether it is within the tolerance."""
    s = cfg.search
    sign = 1 if point.get("higher_is_better", True) else -1
    drop = sign * (ref["value"] - point["value"])
    try:
        a, b = paired_scores(ref, point)
        d, lo, hi = paired_bootstrap(a, b) if sign > 0 else paired_bootstrap(b, a)
        interval = [lo, hi]
    except GradPrunerError:  # pooled metric or no per-item scores: the point estimate alone
        d, interval = drop, None
    ratio = point["loss"] / ref["loss"] if ref["loss"] else float("inf")
    ok = drop <= s.max_drop + 1e-12 if s.max_drop is not None else ratio <= s.max_loss + 1e-12
    return {"drop": d, "drop_interval": interval, "loss_ratio": ratio, "within": bool(ok)}


def budget_value(point: dict, dense: dict, cfg: RunConfig) -> float:
    """How much a point removes, in the search's budget unit."""
    if cfg.search.budget == "layers":
        return float(point.get("k", 0))
    if cfg.search.budget == "params":
        return 1 - point["params"] / dense["params"]
    lat, ref = point["latency"], dense["latency"]
    if cfg.search.latency == "prefill":
        return point["latency"]["prefill_s"] / ref["prefill_s"]
    return ref["decode_tokens_per_s"] / lat["decode_tokens_per_s"]


def next_probe(passed: list[int], failed: list[int], first: int, lo: int, hi: int) -> int | None:
    """The next k to fine-tune: ``first`` if nothing was tried, else the middle of the open range between
    the largest k known to pass and the smallest known to fail (None when that range is empty)."""
    low = max([lo - 1, *passed])
    high = min([hi + 1, *failed])
    if high - low <= 1:
        return None
    if not passed and not failed:
        return min(max(first, lo), hi)
    return (low + high) // 2


RUN_KEYS = ("model", "task", "data", "eval_data", "data_dir", "out", "seed")


def search_config(cfg: RunConfig | None = None, **settings) -> RunConfig:
    """``cfg`` (or the defaults, out ``runs/search``) with keyword settings applied: the run keys
    ``model``, ``task``, ``data``, ``eval_data``, ``data_dir``, ``out``, ``seed``, and any field of the
    ``search`` section (``max_drop``, ``max_loss``, ``budget``, …). Unknown names are one clear error."""
    from gradpruner.pipeline.config import config_from_dict

    base = cfg.to_dict() if cfg is not None else {"out": "runs/search"}
    top = {k: settings.pop(k) for k in RUN_KEYS if k in settings}
    if "data" in top and "task" not in top:
        top["task"] = None
    return config_from_dict({**base, **top, "search": {**base.get("search", {}), **settings}})


def search(cfg: RunConfig | None = None, echo=print, isolate: bool = True, **settings) -> dict:
    """How many layers can go: run the search on a model and task and write search.json, curve.csv,
    search.png, search.md and (when some removal is within the tolerance) plan.json to the out folder.

    Give a run config (``cfg``, its ``search`` section the settings) or keywords, e.g.
    ``search(model="smollm2-135m", task="arc_easy", max_drop=0.02, out="runs/search")`` (``search_config``).
    Returns what search.json holds: every point measured and the recommendation with its verdict."""
    if cfg is None or settings:
        cfg = search_config(cfg, **settings)
    s = cfg.search
    with Collect() as check:  # every problem before any work: the settings, the model, the data, the folder
        check.problems.extend(search_problems(cfg))
        if cfg.plan.granularity != "layer":
            check.problems.append("gradpruner search removes whole layers; set plan.granularity: layer.")
        check(preflight, cfg)
    sr = Search(cfg, echo, isolate)
    dense0, cheap = sr.phase_one()
    for p in cheap:
        p.update(judge(p, dense0, cfg))
    first = max([p["k"] for p in cheap if p["within"]], default=s.min_prune)
    echo(f"fine-tuned: the dense model, then at most {s.finetune_points} removals, starting at {first}")
    dense_ft = sr.tuned(0)
    tuned, passed, failed = [], [], []
    for _ in tqdm(range(s.finetune_points), desc="search, fine-tuned", unit="point"):
        k = next_probe(passed, failed, first, s.min_prune, sr.top)
        if k is None:
            break
        p = sr.tuned(k)
        p.update(judge(p, dense_ft, cfg))
        (passed if p["within"] else failed).append(k)
        tuned.append(p)
        echo(f"  k = {k}: {p['metric']} {p['value']:.4f} (dense {dense_ft['value']:.4f}), loss ratio "
             f"{p['loss_ratio']:.3f}: {'within' if p['within'] else 'outside'} the tolerance")
    result = summarise(cfg, sr, dense0, dense_ft, cheap, tuned)
    best = next((p for p in tuned if p["k"] == result["recommended"]), None)
    plan = read_json(Path(best["run"]) / "plan.json", "Plan") if best is not None else None
    write_search_outputs(Path(cfg.out), result, plan)
    echo(result["verdict"])
    echo(f"wrote {Path(cfg.out) / 'search.md'}" + (f" and the plan {Path(cfg.out) / 'plan.json'}" if plan else ""))
    return result


def summarise(cfg: RunConfig, sr: Search, dense0: dict, dense_ft: dict, cheap: list[dict], tuned: list[dict]) -> dict:
    """The search's record: settings, references, every point (without per-item scores) and the answer."""
    def slim(p: dict, ref: dict) -> dict:
        return {**{k: v for k, v in p.items() if k != "item_scores"}, "budget": budget_value(p, ref, cfg)}

    best = max((p for p in tuned if p["within"]), key=lambda p: p["k"], default=None)
    failed_above = sorted(p["k"] for p in tuned if not p["within"] and best is not None and p["k"] > best["k"])
    return {"model": cfg.model, "task": cfg.task, "data": cfg.data, "search": dataclasses.asdict(cfg.search),
            "num_layers": sr.num_layers, "slice": sr.slice, "finetune": dataclasses.asdict(_point_config(
                cfg, 1, sr.out, sr.offset).finetune), "score_method": cfg.score.method,
            "dense": slim(dense0, dense0), "dense_ft": slim(dense_ft, dense_ft),
            "before_finetune": [slim(p, dense0) for p in cheap], "finetuned": [slim(p, dense_ft) for p in tuned],
            "recommended": None if best is None else best["k"],
            "verdict": verdict(cfg, best, failed_above, tuned, sr.num_layers)}


def verdict(cfg: RunConfig, best: dict | None, failed_above: list[int], tuned: list[dict], num_layers: int) -> str:
    """One paragraph for the user: the answer, how sure it is, and what bounds it."""
    s = cfg.search
    tol = f"a drop of at most {s.max_drop}" if s.max_drop is not None else f"a loss ratio of at most {s.max_loss}"
    if best is None:
        tried = ", ".join(str(p["k"]) for p in tuned)
        return (f"No removal tried ({tried} layers) kept {tol} after fine-tuning; the model needs all its layers for "
                "this tolerance, or a larger tolerance or fine-tuning budget.")
    text = f"Remove {best['k']} of the {num_layers} layers: after the same fine-tune it keeps {tol} "
    if s.max_drop is not None and best.get("drop_interval"):
        lo, hi = best["drop_interval"]
        text += f"(drop {best['drop']:+.3f}, paired 95% interval [{lo:+.3f}, {hi:+.3f}]). "
        text += ("The whole interval is within the tolerance. " if hi <= s.max_drop else
                 f"The measured drop is within the tolerance but its interval reaches {hi:+.3f}: with these "
                 f"{best['n']} items the search cannot rule out a drop above it. ")
    else:
        text += f"(loss ratio {best['loss_ratio']:.3f}, drop {best['drop']:+.3f}). "
    if failed_above:
        text += f"The next removal measured, {failed_above[0]}, is outside the tolerance."
    else:
        text += "No larger removal was fine-tuned within the search's budget of fine-tunes; more may be possible."
    return text
