"""``HEAL_RULES``: how the pruned model makes up for each run of removed layers (ReplaceMe, arXiv 2505.02819).

For a run of removed layers s..e with a kept layer s−1 before it, the pruned model goes straight from
layer s−1 to layer e+1. With A₁ the MLP output (``down_proj``) of layer s−1 in the pruned model and
A₂ = h_e(dense) − h_{s−1}(pruned) + A₁, a linear map T with A₁T ≈ A₂ makes the pruned layer's output
A₁T + (h_{s−1} − A₁) approximate the dense hidden state after the run. T is folded into the weights,
W_down ← Tᵀ·W_down (and b ← Tᵀb), so the model keeps its parameters and shapes. The cuts are healed in
order, each fitted on the model with the earlier folds in place.

A rule is ``fn(dense, pruned, cuts, batches, config) -> dict``: it changes ``pruned`` in place and returns
``{"cuts": [one record per cut], ...}`` (only cuts with a kept layer before them are passed; other keys go
into heal.json as they are).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models.architectures import find_decoder_layers, model_type, only_layers

POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")  # a norm after the MLP: no linear fold


@dataclass(frozen=True)
class Cut:
    """A contiguous run of removed layers (dense indices) and the kept layer before it."""

    removed: tuple[int, ...]
    before: int | None  # dense index of the kept layer before the run; None: the run starts the model
    at: int | None      # that layer's index in the pruned model

    @property
    def last(self) -> int:
        return self.removed[-1]


def find_cuts(keep: list[int], num_layers: int) -> list[Cut]:
    """The runs of layers not in ``keep``, in order."""
    keep = sorted(keep)
    runs: list[list[int]] = []
    for i in range(num_layers):
        if i in keep:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [Cut(tuple(r), r[0] - 1 if r[0] else None, keep.index(r[0] - 1) if r[0] else None) for r in runs]


# --- the closed form (pure) --------------------------------------------------------------------

def token_mask(attention_mask: torch.Tensor, tokens: str) -> torch.Tensor:
    """Which positions are fitted: the real tokens, without each example's first one for ``skip_first``."""
    mask = attention_mask.bool().clone()
    if tokens == "skip_first":
        first = mask.int().argmax(dim=1)
        mask[torch.arange(mask.shape[0]), first] = False
    return mask


def row_weights(target: torch.Tensor, objective: str) -> torch.Tensor:
    """One weight per token row: 1 for ``l2``; 1/‖target‖ for ``cosine``, so every token's squared error is
    relative to its size (to first order the cosine distance) and no attention sink dominates."""
    if objective == "cosine":
        return 1.0 / target.double().norm(dim=1).clamp_min(1e-12)
    return torch.ones(target.shape[0], dtype=torch.float64, device=target.device)


def normal_equations(a1: torch.Tensor, a2: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₁ᵀWA₁, A₁ᵀWA₂) in float64 for rows weighted by ``w`` (W = diag(w²)); sums over batches add up."""
    a1w = a1.double() * w[:, None]
    return a1w.T @ a1w, a1w.T @ (a2.double() * w[:, None])


def solve_fold(gram: torch.Tensor, cross: torch.Tensor, alpha: float) -> torch.Tensor:
    """T = (A₁ᵀA₁ + λI)⁻¹A₁ᵀA₂ with λ = alpha·trace(A₁ᵀA₁)/d (ridge relative to the mean eigenvalue)."""
    d = gram.shape[0]
    lam = alpha * torch.trace(gram) / d
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.lstsq(gram + lam * eye, cross).solution if lam == 0 else torch.linalg.solve(gram + lam * eye, cross)


@torch.no_grad()
def fold_into(linear: torch.nn.Linear, t: torch.Tensor) -> None:
    """Make ``linear``'s output y become yT: W ← TᵀW, b ← Tᵀb (same shapes, no new parameters)."""
    t = t.double().to(linear.weight.device)
    linear.weight.copy_((t.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((t.T @ linear.bias.double()).to(linear.bias.dtype))


# --- the models ---------------------------------------------------------------------------------

def mlp_output(model, index: int) -> torch.nn.Linear:
    """The linear layer whose output is decoder layer ``index``'s MLP contribution to the residual stream."""
    layer = find_decoder_layers(model)[2][index]
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, torch.nn.Linear) or any(hasattr(layer, n) for n in POST_MLP_NORMS):
        raise GradPrunerError(
            f"Model type {model_type(model)!r} cannot be healed: its decoder layers have no mlp.down_proj that "
            "adds to the residual stream directly (a mixture of experts, or a norm after the MLP), so no linear "
            "map folds into it; prune without --heal.")
    return down


def _hook(layer, kind: str, name: str, store: dict):
    def keep(value):
        store[name] = value[0] if isinstance(value, tuple) else value

    if kind == "in":
        return layer.register_forward_pre_hook(
            lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    module = layer if kind == "out" else layer.mlp.down_proj
    return module.register_forward_hook(lambda m, args, out: keep(out))


def states(model, batch: dict, points: dict[str, tuple[str, int]], grad: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model``'s decoder on ``batch`` only as far as needed and return the tensors at ``points``:
    name -> ("out", i) decoder layer i's output, ("in", i) its input, ("mlp", i) its MLP output."""
    parent, _, layers = find_decoder_layers(model)
    store: dict[str, torch.Tensor] = {}
    handles = [_hook(layers[i], kind, name, store) for name, (kind, i) in points.items()]
    try:
        with only_layers(model, list(range(max(i for _, i in points.values()) + 1))), torch.set_grad_enabled(grad):
            parent(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return store


def fit_cut(dense, pruned, cut: Cut, batches: list[dict], config) -> tuple[torch.Tensor, int]:
    """T for one cut from the calibration batches (with the earlier cuts' folds in place), and the tokens fitted."""
    gram = cross = None
    n = 0
    for batch in batches:
        target = states(dense, batch, {"h": ("out", cut.last)})["h"]
        got = states(pruned, batch, {"a1": ("mlp", cut.at), "h": ("out", cut.at)})
        sel = token_mask(batch["attention_mask"], config.tokens)
        a1, h_dense = got["a1"][sel], target[sel]
        g, c = normal_equations(a1, h_dense - got["h"][sel] + a1, row_weights(h_dense, config.objective))
        gram, cross, n = (g, c, n + len(a1)) if gram is None else (gram + g, cross + c, n + len(a1))
    return solve_fold(gram, cross, config.alpha), n


# --- the rules ----------------------------------------------------------------------------------

def none(dense, pruned, cuts, batches, config) -> dict:
    """Leave the pruned model as it is."""
    return {"cuts": [{} for _ in cuts]}


def lstsq(dense, pruned, cuts, batches, config) -> dict:
    """ReplaceMe's closed form, cut by cut in order, folded into each down_proj before a cut."""
    from tqdm.auto import tqdm

    out = []
    for cut in tqdm(cuts, desc="healing: fitting the folds", unit="cut"):
        t, n = fit_cut(dense, pruned, cut, batches, config)
        fold_into(mlp_output(pruned, cut.at), t)
        eye = torch.eye(t.shape[0], dtype=t.dtype)
        out.append({"fitted_tokens": n, "fold_change": float((t - eye).norm() / eye.norm())})
    return {"cuts": out}


def trained(dense, pruned, cuts, batches, config) -> dict:
    """Start from ``lstsq`` (or the pruned model as it is), then train the folds (or the down_proj
    weights before the cuts) with AdamW against the dense model's hidden states or logits."""
    start = (lstsq if config.init == "lstsq" else none)(dense, pruned, cuts, batches, config)
    losses = train_folds(dense, pruned, cuts, batches, config)
    return {**start, "train_loss": {"first": losses[0], "last": losses[-1], "steps": len(losses)}}


HEAL_RULES = {"none": none, "lstsq": lstsq, "trained": trained}


# --- training (the trained rule) -----------------------------------------------------------------

@contextlib.contextmanager
def only_trainable(model, params: list[torch.nn.Parameter]):
    """Gradients for ``params`` only, the model's own ``requires_grad`` flags restored on exit."""
    was = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)


def heal_loss(dense, pruned, cuts, batch: dict, config) -> torch.Tensor:
    """MSE to the dense hidden state after every cut (rows weighted as the objective says), or the KL
    divergence KL(dense ‖ pruned) of the next-token distributions; on the selected tokens."""
    sel = token_mask(batch["attention_mask"], config.tokens)
    if config.target == "logits":
        with torch.no_grad():
            teacher = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        student = pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        p_log, q_log = teacher[sel].float().log_softmax(-1), student[sel].float().log_softmax(-1)
        return (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    target = states(dense, batch, {str(k): ("out", c.last) for k, c in enumerate(cuts)})
    got = states(pruned, batch, {str(k): ("out", c.at) for k, c in enumerate(cuts)}, grad=True)
    loss = 0.0
    for k in target:
        w = row_weights(target[k][sel], config.objective).to(got[k].dtype)
        loss = loss + (((got[k][sel] - target[k][sel]) * w[:, None]) ** 2).mean()
    return loss


def train_folds(dense, pruned, cuts, batches, config) -> list[float]:
    """``config.steps`` AdamW steps (no weight decay) on a d×d matrix per cut applied after its down_proj
    (folded in at the end), or on those down_proj weights themselves; the loss of every step."""
    downs = [mlp_output(pruned, c.at) for c in cuts]
    d = downs[0].weight.shape[0]
    mats, handles = [], []
    if config.train == "fold":
        for down in downs:
            m = torch.nn.Parameter(torch.eye(d, dtype=down.weight.dtype, device=down.weight.device))
            mats.append(m)
            handles.append(down.register_forward_hook(lambda mod, args, out, m=m: out @ m))
        params = mats
    else:
        params = [p for down in downs for p in down.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    losses = []
    try:
        with only_trainable(pruned, [] if mats else params):  # the fold matrices are no parameters of the model
            from tqdm.auto import tqdm

            for step in tqdm(range(config.steps), desc="healing: training the folds", unit="step"):
                loss = heal_loss(dense, pruned, cuts, batches[step % len(batches)], config)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
    if not all(torch.isfinite(torch.tensor(losses))):
        raise GradPrunerError(f"Training the heal folds diverged (loss {losses[-1]}); lower --lr or use --rule lstsq.")
    for down, m in zip(downs, mats):
        fold_into(down, m.detach())
    return losses
