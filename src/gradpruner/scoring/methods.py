"""Layer-selection methods other than IGIA: one small function per method, in a registry.

Every method returns one importance score per decoder layer (higher = more important), so
``scores.json``, ``gradpruner plan`` and the pipeline treat all of them alike::

    gradpruner score --method block_influence --model smollm2-135m --task arc_easy --out s/
    # or in a config:   score: {method: block_influence}

A method is ``fn(ctx) -> dict`` with at least ``layer_scores``; extra keys (e.g. LaCo's merge groups)
go into scores.json as they are. IGIA (``igia``, ``igia_norm``) trains LoRA and lives in
``api.score``/``capture``; ``full_grad`` is here. Methods that need no training run no steps.
"""
from __future__ import annotations

import math
import random as _random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradpruner.data.examples import PadCollator
from gradpruner.errors import GradPrunerError
from gradpruner.models import architectures
from gradpruner.scoring.catalog import CATALOG, MethodInfo
from gradpruner.scoring.greedy import (
    POOLS,
    calib_loss,
    greedy_block_removal,
    greedy_removal,
    lowest,
    pool_size,
)


@dataclass
class Context:
    """What a method may use: the model, its tokenizer, tokenized task examples and the budgets."""
    model: torch.nn.Module
    tokenizer: object
    features: list[dict]
    runtime: object = None          # models.runtime.Runtime: the batches go to its device
    seed: int = 0
    calib_examples: int = 64        # examples for forward/gradient methods (ShortGPT, LaCo, Taylor)
    batch_size: int = 8
    steps: int = 40                 # optimizer steps for full_grad
    lr: float = 1e-4
    target: int | None = None       # layers to remove (LaCo needs it to know when to stop)
    options: dict = field(default_factory=dict)  # method-specific knobs (laco_group, laco_threshold)

    def batches(self):
        """The first ``calib_examples`` examples of a seeded shuffle, in padded batches."""
        idx = list(range(len(self.features)))
        _random.Random(self.seed).shuffle(idx)
        chosen = [self.features[i] for i in idx[: self.calib_examples]]
        collate = PadCollator(self.tokenizer.pad_token_id)
        batches = [collate(chosen[i:i + self.batch_size]) for i in range(0, len(chosen), self.batch_size)]
        return [self.runtime.inputs(b) for b in batches] if self.runtime is not None else batches


def _layers(model) -> torch.nn.ModuleList:
    return architectures.find_decoder_layers(model)[2]


def train_steps(model, tok, features, callback, *, steps: int, batch_size: int, lr: float, seed: int,
                grad_accum: int = 1, max_grad_norm: float = 0.0, work_dir=None, progress: bool = False,
                runtime=None) -> None:
    """``steps`` optimizer steps at a constant learning rate (no warm-up, no decay, nothing saved),
    with ``callback`` seeing every step: the short runs that gradient-based scoring needs.

    ``batch_size`` is the global batch of an optimizer step: under ``torchrun`` / ``accelerate launch``
    each of the W processes takes ``batch_size / (W · grad_accum)`` examples per micro-batch, so the
    optimizer steps see the same examples as in one process (see ``distributed``). ``runtime`` (resolved;
    None: auto) gives the device and the autocast precision."""
    import shutil
    import tempfile

    from transformers import Trainer, TrainingArguments

    from gradpruner.models.runtime import resolve
    from gradpruner.util.distributed import per_device_batch

    rt = resolve(runtime)  # activated by load_model, which put the model there
    per_device = per_device_batch(batch_size, grad_accum)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="gradpruner-steps-"))
    args = TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=max_grad_norm, logging_steps=1, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not progress,
        # no float16 autocast: its loss scaling would put scaled gradients into the capture
        **{**rt.training_precision(), "fp16": False})
    _check_launch(args)
    try:
        Trainer(model=model, args=args, train_dataset=features, data_collator=PadCollator(tok.pad_token_id),
                callbacks=[callback]).train()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_launch(args) -> None:
    from gradpruner.util.distributed import world_size

    if args.world_size != world_size():
        raise GradPrunerError(f"The launcher started {args.world_size} processes but the environment says "
                              f"{world_size()} (WORLD_SIZE); launch with torchrun or accelerate launch.")


# --- training-free ---------------------------------------------------------------------------

def last_n(ctx: Context) -> dict:
    """Drop the top layers first (the layer-wise mode of LLM-Pruner and others): score = L − index."""
    n = len(_layers(ctx.model))
    return {"layer_scores": [float(n - j) for j in range(n)]}


def random_order(ctx: Context) -> dict:
    """A seeded random ranking: the floor any method must beat."""
    n = len(_layers(ctx.model))
    perm = list(range(1, n + 1))
    _random.Random(ctx.seed).shuffle(perm)
    return {"layer_scores": [float(p) for p in perm]}


def magnitude(ctx: Context) -> dict:
    """Σ |W| over every parameter of the layer (weights only, no data)."""
    return {"layer_scores": [float(sum(p.detach().abs().sum() for p in layer.parameters()))
                             for layer in _layers(ctx.model)]}


# --- forward / gradient on calibration data ----------------------------------------------------

def block_influence(ctx: Context) -> dict:
    """ShortGPT: BI_j = 1 − mean over real tokens of cos(input of layer j, output of layer j)."""
    layers = _layers(ctx.model)
    sums = [0.0] * len(layers)
    count = 0.0
    state: dict = {}

    def pre(j):
        def hook(mod, args, kwargs):
            state[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(j):
        def hook(mod, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(state[j].float(), out.float(), dim=-1)
            sums[j] += float((cos * state["mask"]).sum())
        return hook

    handles = [h for j, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(pre(j), with_kwargs=True),
        layer.register_forward_hook(post(j), with_kwargs=True))]
    ctx.model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(ctx.batches(), desc="block influence", unit="batch"):
                state["mask"] = batch["attention_mask"].float()
                ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                count += float(state["mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return {"layer_scores": [1.0 - s / count for s in sums], "calib_tokens": int(count)}


def taylor(ctx: Context) -> dict:
    """First-order Taylor importance: Σ over the layer's parameters of |W ⊙ ∂L/∂W| on task data."""
    model = ctx.model
    model.eval()  # no dropout; gradients still flow
    model.zero_grad(set_to_none=True)
    batches = ctx.batches()
    for batch in tqdm(batches, desc="taylor", unit="batch"):
        loss = model(**batch, use_cache=False).loss / len(batches)
        loss.backward()
    scores = []
    for layer in _layers(model):
        scores.append(float(sum((p.detach() * p.grad).abs().sum() for p in layer.parameters() if p.grad is not None)))
    model.zero_grad(set_to_none=True)
    return {"layer_scores": scores}


def removal_taylor(ctx: Context) -> dict:
    """First-order estimate of what removing a layer does to the loss: a layer adds Δ_j = out_j − in_j
    to the residual stream, so dropping it changes the loss by ≈ −g_j·Δ_j with g_j = ∂L/∂out_j.
    Score = mean over real tokens of |g_j·Δ_j| on task data (one backward pass per batch)."""
    layers = _layers(ctx.model)
    sums, count, state = [0.0] * len(layers), 0.0, {}

    def hook(j):
        def fn(mod, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            state[j] = ((args[0] if args else kwargs["hidden_states"]).detach(), out)
        return fn

    handles = [layer.register_forward_hook(hook(j), with_kwargs=True) for j, layer in enumerate(layers)]
    ctx.model.eval()
    try:
        for batch in tqdm(ctx.batches(), desc="removal taylor", unit="batch"):
            ctx.model.zero_grad(set_to_none=True)
            ctx.model(**batch, use_cache=False).loss.backward()
            mask = batch["attention_mask"].float()
            count += float(mask.sum())
            for j, (inp, out) in state.items():
                sums[j] += float(((out.grad * (out.detach() - inp)).sum(-1).abs() * mask).sum())
            state.clear()
    finally:
        for h in handles:
            h.remove()
        ctx.model.zero_grad(set_to_none=True)
    return {"layer_scores": [s / count for s in sums], "calib_tokens": int(count)}


def full_grad(ctx: Context) -> dict:
    """The IGIA formula on true dense gradients: T full fine-tuning steps, F_W = mean_i (∂L/∂W)_i²,
    layer score Σ F_W over its linear modules. The reference the LoRA proxy approximates; it costs a
    full fine-tuning step per step (gradients and AdamW state for every weight)."""
    from transformers import TrainerCallback, set_seed

    from gradpruner.util import distributed

    set_seed(ctx.seed)
    linear = architectures.layer_linear_modules(ctx.model)
    per_step: list[list[float]] = []

    class Capture(distributed.GradientReader, TrainerCallback):
        """Whole averaged gradients through ``distributed``'s accessor (DDP, FSDP, DeepSpeed alike)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start_reading(args, model, kwargs.get("optimizer"))

        def read(self) -> None:
            row = [0.0] * len(linear)
            for j, mods in linear.items():
                grads = [distributed.full_grad(m.weight, self.backend) for m in mods.values()]
                row[j] = float(sum(g.double().pow(2).sum() for g in grads if g is not None))
            if not all(math.isfinite(v) for v in row):
                from gradpruner.errors import GradPrunerError
                raise GradPrunerError(f"Non-finite gradient at full_grad step {len(per_step) + 1}; lower --lr.")
            per_step.append(row)

    train_steps(ctx.model, ctx.tokenizer, ctx.features, Capture(), steps=ctx.steps, batch_size=ctx.batch_size,
                lr=ctx.lr, seed=ctx.seed, runtime=ctx.runtime)
    n = len(per_step)
    scores = [sum(row[j] for row in per_step) / max(n, 1) for j in range(len(linear))]
    return {"layer_scores": scores, "steps": n, "step_layer_sq_norms": per_step}


def removal_loss(ctx: Context) -> dict:
    """Shortened LLaMA's PPL criterion (Kim et al. 2024): remove each layer alone and measure the
    increase of the mean calibration loss; score = that increase (one forward pass per layer)."""
    n = len(architectures.find_decoder_layers(ctx.model)[2])
    batches = ctx.batches()
    ctx.model.eval()

    def loss_without(j: int | None) -> float:
        return calib_loss(ctx.model, batches, [i for i in range(n) if i != j])

    base = loss_without(None)
    scores = [loss_without(j) - base for j in tqdm(range(n), desc="removal loss", unit="layer")]
    return {"layer_scores": scores, "calib_loss": base}


def greedy_loss(ctx: Context) -> dict:
    """Greedy removal by measured cost (SLEB / Shortened LLaMA iterative): ``target`` times, remove the
    candidate whose removal, on top of those already removed, raises the calibration loss least
    (``scoring.greedy``). Candidates: every layer (``greedy_pool: all``) or the ⌈greedy_pool_factor ·
    target⌉ with the lowest block influence (``block_influence``, which also breaks ties)."""
    pool = ctx.options.get("greedy_pool", "all")
    if pool not in POOLS:
        raise GradPrunerError(f"greedy_pool {pool!r} is not known; use {' or '.join(POOLS)} "
                              "(IGIA's pool is the method igia_greedy).")
    if ctx.target is None:
        raise GradPrunerError("The greedy_loss method needs the number of layers to remove; pass --prune N "
                              "to `gradpruner score` (the pipeline passes plan.prune).")
    n = len(_layers(ctx.model))
    start, guide, extra = time.perf_counter(), None, {}
    candidates = list(range(n))
    if pool == "block_influence":
        guide = block_influence(ctx)["layer_scores"]
        factor = float(ctx.options.get("greedy_pool_factor", 2.0))
        candidates = lowest(guide, pool_size(ctx.target, n, factor))
        extra = {"block_influence": guide, "greedy_pool_factor": factor}
    search = greedy_block_removal if ctx.options.get("greedy_unit", "layer") == "block" else greedy_removal
    res = search(ctx.model, ctx.batches(), candidates, ctx.target, guide, desc="greedy loss")
    res["forward_passes"] += 1 if guide is not None else 0  # block influence's pass over the batches
    res["seconds"] = time.perf_counter() - start
    return {**res, "greedy_pool": pool, **extra}


# --- LaCo ------------------------------------------------------------------------------------

def _final_hidden(model, keep: list[int], batches) -> list[torch.Tensor]:
    with architectures.only_layers(model, keep), torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                      output_hidden_states=True).hidden_states[-1] for b in batches]


def _similarity(a: list[torch.Tensor], b: list[torch.Tensor], batches) -> float:
    num = den = 0.0
    for x, y, batch in zip(a, b, batches):
        m = batch["attention_mask"].float()
        num += float((torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1) * m).sum())
        den += float(m.sum())
    return num / den


def laco(ctx: Context) -> dict:
    """LaCo (Yang et al. 2024): from the top down, collapse ``laco_group``−1 rear layers into the layer
    below them, θ_base += Σ_k (θ_k − θ_base) on the linear modules, and keep the collapse only if the
    last hidden states on calibration data stay cosine-similar (> ``laco_threshold``) to the original
    model's; otherwise move one layer down. Groups never overlap (interval = group size), so every
    merge is expressible as a plan; stops when ``target`` layers are collapsed. If the threshold
    rejects too many collapses to reach ``target``, the most similar rejected ones are taken
    ("forced", recorded in scores.json) so that every method removes the same number of layers.

    Collapsed layers get the lowest scores in the order they were collapsed; the plan then merges
    each into the nearest kept layer below it — its LaCo base — with ``prune.merge_rule: laco``."""
    from gradpruner.errors import GradPrunerError

    if ctx.target is None or ctx.target < 1:
        raise GradPrunerError("The laco method needs the number of layers to remove; pass --prune N "
                              "to `gradpruner score` (the pipeline passes plan.prune).")
    group = int(ctx.options.get("laco_group", 4))
    threshold = float(ctx.options.get("laco_threshold", 0.65))
    lowest = int(ctx.options.get("laco_lowest", 1))
    model = ctx.model
    layers = list(architectures.find_decoder_layers(model)[2])
    linear = architectures.layer_linear_modules(model)
    batches = ctx.batches()
    model.eval()
    reference = _final_hidden(model, list(range(len(layers))), batches)
    removed: list[int] = []
    groups, trials = {}, []
    base = len(layers) - group
    bar = tqdm(desc="laco collapses tried", unit="trial")
    while len(removed) < ctx.target and base >= lowest:
        bar.update(1)
        srcs = list(range(base + 1, min(base + group, len(layers))))[: ctx.target - len(removed)]
        saved = {rel: m.weight.detach().clone() for rel, m in linear[base].items()}
        with torch.no_grad():
            for rel, m in linear[base].items():
                m.weight.add_(sum(linear[s][rel].weight - saved[rel] for s in srcs))
        keep = [j for j in range(len(layers)) if j not in removed and j not in srcs]
        sim = _similarity(_final_hidden(model, keep, batches), reference, batches)
        trials.append({"base": base, "sources": srcs, "similarity": sim, "accepted": sim > threshold})
        if sim > threshold:
            removed += srcs
            groups[str(base)] = srcs
            base -= group
        else:
            with torch.no_grad():
                for rel, m in linear[base].items():
                    m.weight.copy_(saved[rel])
            base -= 1
    bar.close()
    forced = _force(trials, removed, groups, linear, ctx.target)
    order = {j: i for i, j in enumerate(removed)}
    n = len(layers)
    bases = {int(b) for b in groups}
    # collapsed layers: 0 < score < 1, first collapsed lowest; bases highest (never removed without
    # their collapse); any other layer in between, deeper = lower.
    scores = [(1 + order[j]) / (len(removed) + 1) if j in order else (3.0 if j in bases else 1.0 + (n - j) / n)
              for j in range(n)]
    return {"layer_scores": scores, "laco": {"groups": groups, "trials": trials, "threshold": threshold,
                                             "group": group, "forced": forced, "shortfall": ctx.target - len(removed)}}


def _force(trials: list[dict], removed: list[int], groups: dict, linear: dict, target: int) -> list[str]:
    """When fewer than ``target`` layers passed the threshold, take the rejected collapses with the
    highest similarity (non-overlapping) until the target is met, and say so: LaCo as published would
    stop short of the budget instead."""
    used = set(removed) | {int(b) for b in groups}
    forced = []
    for t in sorted((t for t in trials if not t["accepted"]), key=lambda t: -t["similarity"]):
        if len(removed) >= target:
            break
        srcs = t["sources"][: target - len(removed)]
        if used & {t["base"], *srcs}:
            continue
        with torch.no_grad():
            saved = {rel: m.weight.detach().clone() for rel, m in linear[t["base"]].items()}
            for rel, m in linear[t["base"]].items():
                m.weight.add_(sum(linear[s][rel].weight - saved[rel] for s in srcs))
        removed += srcs
        groups[str(t["base"])] = srcs
        used |= {t["base"], *srcs}
        forced.append(str(t["base"]))
    return forced


@dataclass(frozen=True)
class Method(MethodInfo):
    """A layer-selection method (an entry of ``METHODS``): its description in ``scoring.catalog`` (trains?,
    writes factors?, ``about``, ``kind``) and ``fn(ctx)``, the function of a ``direct`` method (None for
    the IGIA methods and variants, which ``api.score`` runs)."""

    fn: object = None


# The functions of the direct methods (kind "direct" in the catalog); the IGIA methods and variants have none.
FUNCTIONS = {"full_grad": full_grad, "block_influence": block_influence, "taylor": taylor,
             "removal_taylor": removal_taylor, "removal_loss": removal_loss, "greedy_loss": greedy_loss,
             "magnitude": magnitude, "last_n": last_n, "random": random_order, "laco": laco}
METHODS: dict[str, Method] = {name: Method(**vars(info), fn=FUNCTIONS.get(name)) for name, info in CATALOG.items()}
