"""Budgets users think in: how many layers must go for the pruned model to reach a measured latency ratio,
or for its weights to fit a memory budget.

Layers leave in the plan's order (the scores' ranking), so the answer is the fewest of them whose removal
meets the target. Weight memory is exact arithmetic over the tensors; latency is measured on this machine
as ``gradpruner bench`` measures it (``costs.latency``: one 128-token prompt, batch 1, then 16 decoded
tokens, median of the repetitions), the candidate models built by the caller.
"""
from __future__ import annotations

from collections.abc import Callable

from gradpruner.errors import GradPrunerError
from gradpruner.measure.costs import latency

GIB = 1024 ** 3


def weight_bytes(module, itemsize: int | None = None) -> int:
    """Bytes of a module's weights (shared tensors, e.g. tied embeddings, counted once), at ``itemsize``
    bytes per number (None: as held). Works on a model built on the meta device (shapes only): a tied
    tensor is one Parameter object, which ``parameters()`` lists once."""
    return sum(p.numel() * (itemsize or p.element_size()) for p in module.parameters())


def layers_for_memory(total_bytes: int, layer_bytes: list[int], order: list[int], gib: float) -> int:
    """Fewest layers, taken in ``order``, whose removal brings ``total_bytes`` to at most ``gib`` GiB."""
    if not gib > 0:
        raise GradPrunerError(f"--target-memory must be a positive number of GiB (got {gib!r}).")
    left = total_bytes
    for n in range(len(order) + 1):
        if left <= gib * GIB:
            return n
        if n < len(order):
            left -= layer_bytes[order[n]]
    raise GradPrunerError(f"--target-memory {gib} GiB cannot be reached: with one layer left the weights take "
                          f"{left / GIB:.3f} GiB; ask for at least that.")


def latency_ratio(dense: dict, pruned: dict, kind: str) -> float:
    """Prefill seconds or seconds per decoded token of ``pruned`` over ``dense`` (``costs.latency`` results)."""
    if kind == "prefill":
        return pruned["prefill_s"] / dense["prefill_s"]
    return dense["decode_tokens_per_s"] / pruned["decode_tokens_per_s"]


def layers_for_latency(dense_model, build: Callable[[int], object], n_layers: int, target: float, kind: str = "prefill",
                       reps: int = 5, echo=print) -> tuple[int, dict[int, float]]:
    """Fewest layers (in the plan's order) whose removal brings the measured latency ratio to ``target`` or
    below: a binary search over the count, ``build(k)`` giving the model without the first k layers of the
    order. Returns the count and every ratio measured, by count. Assumes latency falls as layers go, which
    holds up to measurement noise; the ratio measured for the answer is in the returned dict."""
    if kind not in ("prefill", "decode"):
        raise GradPrunerError(f"--latency {kind!r}: use prefill or decode.")
    if not 0 < target < 1:
        raise GradPrunerError(f"--target-latency must be a ratio between 0 and 1, e.g. 0.7 (got {target!r}).")
    from tqdm.auto import tqdm

    bar = tqdm(total=1 + max(1, n_layers - 1).bit_length() + 1, desc=f"measuring {kind} latency", unit="model")
    dense = latency(dense_model, reps=reps)
    bar.update()
    measured: dict[int, float] = {}

    def ratio(k: int) -> float:
        if k not in measured:
            measured[k] = latency_ratio(dense, latency(build(k), reps=reps), kind)
            bar.update()
            bar.set_postfix_str(f"{k} removed: {measured[k]:.3f}×")
            echo(f"  {k} layers removed: {kind} latency {measured[k]:.3f} of the dense model's")
        return measured[k]

    lo, hi = 0, n_layers - 1  # the answer lies in (lo, hi] once hi is known to meet the target
    if ratio(hi) > target:
        raise GradPrunerError(f"--target-latency {target} cannot be reached on this machine: with one layer left the "
                              f"{kind} latency is {measured[hi]:.3f} of the dense model's; ask for at least that.")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ratio(mid) <= target:
            hi = mid
        else:
            lo = mid
    bar.close()
    return hi, measured
