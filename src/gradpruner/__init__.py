"""gradpruner: prune a fine-tuned LLM for one downstream task with early LoRA gradients.

The public names below are imported on first use (PEP 562), not with the package: they pull in torch
and transformers, and ``gradpruner --help`` (which imports ``gradpruner.cli``, hence this package)
must answer without them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gradpruner.errors import GradPrunerError
from gradpruner.util.versions import __version__

if TYPE_CHECKING:  # for type checkers (and tests/test_architecture.py); at run time see __getattr__
    from gradpruner.api import heal, plan, prune, score
    from gradpruner.pipeline.search import search
    from gradpruner.scoring.capture import IGIACallback

_LAZY = {"score": "gradpruner.api", "plan": "gradpruner.api", "prune": "gradpruner.api", "heal": "gradpruner.api",
         "search": "gradpruner.pipeline.search", "IGIACallback": "gradpruner.scoring.capture"}

__all__ = ["score", "plan", "prune", "heal", "search", "IGIACallback", "GradPrunerError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'gradpruner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
