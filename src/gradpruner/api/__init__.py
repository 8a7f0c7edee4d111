"""The Python API: score → plan → prune (→ heal). The CLI is a thin layer over these functions.

Each stage validates everything it can before expensive work, writes readable files atomically
(``scores.json`` + ``igia.safetensors``, ``plan.json``, a ``save_pretrained`` folder) and records its
configuration next to its output, so every stage can be rerun alone. One module per stage.
"""
from gradpruner.api.healing import heal
from gradpruner.api.planning import plan
from gradpruner.api.pruning import prune
from gradpruner.api.scoring import layer_param_counts, resolve_steps, score

__all__ = ["heal", "layer_param_counts", "plan", "prune", "resolve_steps", "score"]
