"""The prune stage's settings: one field per setting, its default and help (CLI, YAML and API alike)."""
from __future__ import annotations

from dataclasses import dataclass

from gradpruner.util.options import opt


@dataclass
class PruneConfig:
    density: float = opt(0.2, "fraction p of a merged module's entries kept, ranked by IGIA")
    merge_rule: str = opt("sign_sum", "sign_sum (paper Eq. 5), sign_mean (Eq. 6), fisher (App. B.2), weighted_average "
                          "(Fig. 7), ties, laco or none; see docs/merge_rules.md")
    out_of_core: bool | None = opt(None, "stream the safetensors shards without loading the model (empty: whenever the "
                                   "input allows it; --no-out-of-core / --in-memory loads the model)")
    max_shard_size: str = opt("2GB", "largest output shard when streaming")
