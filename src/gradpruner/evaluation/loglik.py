"""Log-likelihood of multiple-choice answers, as lm-evaluation-harness computes it, but faster.

lm-eval's HFLM runs every (context, continuation) pair as its own sequence and applies the output
layer at every position. Here a question's context runs once for all its choices — packed into one
row with a mask that keeps the choices apart, or (for sliding-window models) through a KV cache copied
to every choice — and the output layer (lm_head) is applied only near the answer tokens. The
tokenisation, the split between context and continuation and the left truncation are HFLM's, so the
numbers agree with it up to float rounding (tests/test_evaluation.py checks both against each other).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from gradpruner.data.tasks import MCItem
from gradpruner.models.architectures import cache_keyword

_DEFAULT_MAX_LENGTH = 2048  # HFLM's default when neither config nor tokenizer gives one


def _encode(tokenizer, text: str) -> list[int]:
    # HFLM.tok_encode for a causal model with add_bos_token unset: the tokenizer's own default
    # special tokens, except when the text already starts with the BOS text.
    prefix = _prefix_token_id(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def _prefix_token_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's HFLM splits a causal-LM request.

    Trailing spaces of the context move to the continuation; the whole text is encoded once and the
    continuation is what follows the separately encoded context. An empty context becomes the BOS
    (or EOS) token.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model, tokenizer=None, max_length: int | None = None) -> int:
    """The context length lm-eval's HFLM assumes for ``model`` (config, then tokenizer, then 2048), capped
    at a user's ``max_length`` when one is given (HFLM's ``max_length``)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    limit = next((int(getattr(cfg, attr)) for attr in ("n_positions", "max_position_embeddings", "n_ctx")
                  if getattr(cfg, attr, None) is not None), None)
    if limit is None:
        known = getattr(tokenizer, "model_max_length", None)
        limit = int(known) if known is not None and known < 1e12 else _DEFAULT_MAX_LENGTH
    return limit if max_length is None else min(max_length, limit)


def _forward(model, takes_logits_to_keep: bool, **kwargs):
    if takes_logits_to_keep:
        return model(**kwargs).logits
    kwargs.pop("logits_to_keep", None)
    return model(**kwargs).logits


METHODS = ("auto", "packed", "cache")


@torch.no_grad()
def score_choices(model, tokenizer, items: Sequence[MCItem], batch_size: int = 8, progress: bool = True,
                  desc: str = "scoring choices", method: str = "auto",
                  max_length: int | None = None) -> list[list[float]]:
    """Log-likelihood of every choice of every item, in item order (lm-eval HFLM's numbers).

    ``max_length`` is HFLM's ``max_length`` (capped at the model's context length, which is also the
    default): a choice is scored on the last max_length + 1 tokens of context and continuation, so a long
    context loses its left end.

    ``batch_size`` counts questions; all their choices run together. Items are processed longest
    first (less padding) and returned in the order given. ``method``:

    * "packed": one forward pass per batch; each question is one row holding its context once and
      then every choice, with an attention mask that lets each choice see the context and itself only
      (position ids restart after the context). Winogrande's contexts share their common prefix.
    * "cache": each distinct context runs once and its KV cache is copied to each continuation.
    * "auto" (default): "packed", except for batches that reach beyond a sliding attention window
      (the custom mask would ignore the window) or attention kernels that take no custom masks.
    """
    if method not in METHODS:
        from gradpruner.errors import did_you_mean

        raise did_you_mean(method, METHODS, "scoring method")
    model.eval()
    device = next(model.parameters()).device
    max_len = model_max_length(model, tokenizer, max_length)
    params = inspect.signature(model.forward).parameters
    takes_keep = "logits_to_keep" in params
    cache_kw = cache_keyword(model)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    window = _attention_window(model)
    pairs = [[_truncate(*encode_pair(tokenizer, c, k), max_len) for c, k in zip(it.contexts, it.continuations)]
             for it in items]
    longest = max((len(k) for p in pairs for _, k in p), default=0)
    if longest > max_len:  # HFLM asserts the same: a continuation must fit whole
        from gradpruner.errors import GradPrunerError

        raise GradPrunerError(f"An answer choice is {longest} tokens, more than --max-length {max_len}; "
                              "use a larger --max-length.")
    order = sorted(range(len(items)), key=lambda i: -sum(len(c) + len(k) for c, k in pairs[i]))
    results: list[list[float]] = [[] for _ in items]
    bar = tqdm(total=len(items), desc=desc, unit="q", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        packed = [_pack(pairs[i]) for i in batch]
        fits = window is None or max(len(p[0]) for p in packed) <= window
        if method == "packed" or (method == "auto" and fits):
            lls = _score_packed(model, packed, device, takes_keep, pad_id)
        else:
            flat = [pair for i in batch for pair in pairs[i]]
            scores = _score_batch(model, flat, device, takes_keep, cache_kw, pad_id)
            lls, pos = [], 0
            for i in batch:
                lls.append(scores[pos:pos + len(pairs[i])])
                pos += len(pairs[i])
        for i, ll in zip(batch, lls):
            results[i] = ll
        bar.update(len(batch))
    bar.close()
    return results


def _attention_window(model) -> int | float | None:
    """The number of positions a packed row may span: a sliding window or attention chunk if the
    model has one, 0 for attention kernels that ignore custom masks, None for no limit."""
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return 0
    cfg = getattr(model.config, "text_config", None) or model.config
    limits = [getattr(cfg, a, None) for a in ("sliding_window", "attention_chunk_size")]
    if getattr(cfg, "use_sliding_window", True) is False:
        limits[0] = None
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    return min(limits) if limits else None


def _pack(pairs: list[tuple[tuple[int, ...], list[int]]]):
    """One row for one question: (tokens, positions, segments, [(logit columns, targets)] per choice).

    The row is the contexts' common prefix (segment 0) followed by one branch per choice (segment
    j + 1): the rest of its context, then its continuation. Positions restart after the prefix.
    """
    contexts = [c for c, _ in pairs]
    p = 0
    while all(len(c) > p for c in contexts) and len({c[p] for c in contexts}) == 1:
        p += 1
    tokens, positions, segments = list(contexts[0][:p]), list(range(p)), [0] * p
    needs = []
    for j, (ctx, cont) in enumerate(pairs):
        start = len(tokens)
        branch = list(ctx[p:]) + list(cont)
        tokens += branch
        positions += range(p, p + len(branch))
        segments += [j + 1] * len(branch)
        first = start + len(ctx) - p  # column of the continuation's first token
        # Each token is predicted at the column before it; the first one, when the branch holds no
        # context, at the end of the shared prefix.
        where = [first - 1 if len(ctx) > p else p - 1] + [first + t - 1 for t in range(1, len(cont))]
        needs.append((where[:len(cont)], list(cont)))
    return tokens, positions, segments, needs


def _score_packed(model, packed, device, takes_keep: bool, pad_id: int) -> list[list[float]]:
    width = max(len(t) for t, _, _, _ in packed)
    n = len(packed)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)  # -1: padding
    rows, cols, targets, owners = [], [], [], []
    for r, (tokens, positions, segments, needs) in enumerate(packed):
        off = width - len(tokens)  # left padding: every row ends in the last column
        ids[r, off:], pos[r, off:], seg[r, off:] = (torch.tensor(tokens), torch.tensor(positions),
                                                    torch.tensor(segments))
        for j, (where, want) in enumerate(needs):
            rows += [r] * len(want)
            cols += [off + c for c in where]
            targets += want
            owners += [(r, j)] * len(want)
    q = torch.arange(width)
    allowed = ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])) & (seg[:, None, :] >= 0) \
        & (q[None, None, :] <= q[None, :, None])  # [batch, query, key]
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    keep = width - min(cols) if cols else 1
    kwargs = {"logits_to_keep": keep} if takes_keep else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   use_cache=False, **kwargs).logits[:, -keep:]
    picked = logits[torch.tensor(rows), torch.tensor(cols) - (width - keep)]
    logp = torch.log_softmax(picked.float(), dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    out = [[0.0] * len(needs) for _, _, _, needs in packed]
    for (r, j), value in zip(owners, logp.tolist()):
        out[r][j] += value
    return out


def _truncate(ctx: list[int], cont: list[int], max_len: int) -> tuple[tuple[int, ...], list[int]]:
    # HFLM feeds (ctx + cont)[-(max_len + 1):][:-1]: the context loses its left end first.
    keep = max(max_len + 1 - len(cont), 1)
    return tuple(ctx[-keep:]), cont


def _score_batch(model, pairs: list[tuple[tuple[int, ...], list[int]]], device, takes_keep: bool,
                 cache_kw: str, pad_id: int) -> list[float]:
    """Summed log-probabilities of each continuation after its context."""
    contexts = list(dict.fromkeys(ctx for ctx, _ in pairs))  # distinct contexts, first-seen order
    row_of = {ctx: r for r, ctx in enumerate(contexts)}
    width = max(len(c) for c in contexts)
    # Stage 1: every distinct context once, left-padded so its last token is the last column.
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for r, ctx in enumerate(contexts):
        ids[r, width - len(ctx):] = torch.tensor(ctx)
        mask[r, width - len(ctx):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                **({"logits_to_keep": 1} if takes_keep else {}))
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's 1st token
    lls = [float(first[row_of[ctx], cont[0]]) if cont else 0.0 for ctx, cont in pairs]

    # Stage 2: the rest of each continuation, on a copy of its context's cache.
    longer = [j for j, (_, cont) in enumerate(pairs) if len(cont) > 1]
    if not longer:
        return lls
    rows = torch.tensor([row_of[pairs[j][0]] for j in longer], device=device)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.reorder_cache(rows)  # index_select on the batch dim: one copy per continuation
    cwidth = max(len(pairs[j][1]) - 1 for j in longer)
    inp = torch.full((len(longer), cwidth), pad_id, dtype=torch.long)
    tgt = torch.zeros((len(longer), cwidth), dtype=torch.long)
    cmask = torch.zeros((len(longer), cwidth), dtype=torch.long)
    for r, j in enumerate(longer):
        cont = pairs[j][1]
        inp[r, :len(cont) - 1] = torch.tensor(cont[:-1])
        tgt[r, :len(cont) - 1] = torch.tensor(cont[1:])
        cmask[r, :len(cont) - 1] = 1
    inp, tgt, cmask = inp.to(device), tgt.to(device), cmask.to(device)
    ctx_len = mask.sum(-1)[rows]
    position_ids = ctx_len[:, None] + torch.arange(cwidth, device=device)[None]
    logits = _forward(model, takes_keep, input_ids=inp, attention_mask=torch.cat([mask[rows], cmask], dim=1),
                      position_ids=position_ids, use_cache=True, logits_to_keep=0, **{cache_kw: cache})
    real = cmask.bool()
    logp = torch.log_softmax(logits[real].float(), dim=-1).gather(-1, tgt[real][:, None])[:, 0]
    per_row = torch.zeros(len(longer), device=device).index_add_(
        0, torch.nonzero(real)[:, 0], logp)
    for r, j in enumerate(longer):
        lls[j] += float(per_row[r])
    return lls
