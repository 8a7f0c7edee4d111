"""The plan stage's settings: one field per setting, its default and help (CLI, YAML and API alike)."""
from __future__ import annotations

from dataclasses import dataclass

from gradpruner.util.options import opt

DEFAULT_PRUNE = 12


@dataclass
class PlanConfig:
    prune: int | None = opt(DEFAULT_PRUNE, "decoder layers to remove, merged ones included (or give target_params)")
    target_params: float | None = opt(None, "fraction of all parameters to remove, e.g. 0.4 (instead of prune)")
    target_latency: float | None = opt(None, "latency to reach as a ratio to the dense model's, e.g. 0.7, measured on this "
                                       "machine as gradpruner bench does (instead of prune; needs --model)")
    latency: str = opt("prefill", "with target_latency: prefill (one 128-token prompt) or decode (per generated token)")
    target_memory: float | None = opt(None, "GiB the pruned model's weights may take at most, in the checkpoint's "
                                      "dtype (instead of prune; needs --model)")
    merge: int = opt(0, "of the removed layers, how many are merged into the nearest kept one (the paper merges 3 of 13)")
    from_method: str | None = opt(None, "rank by the scores of this method: empty for the method that scored; for IGIA "
                                  "scores also igia or igia_norm (the authors' release), which the same file holds")
    granularity: str = opt("layer", "layer; hidden: remove the same parameters as residual-stream dimensions ranked "
                           "by IGIA (paper Appendix D); or block: remove attention/MLP block pairs found by a greedy "
                           "block search (score.greedy_unit block)")
    protect_last: int = opt(0, "never remove the last K layers")
    max_block: int | None = opt(None, "never remove more than K consecutive layers (empty: no limit)")
