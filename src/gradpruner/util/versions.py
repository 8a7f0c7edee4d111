"""The package's version, and the versions of everything a result depends on (recorded beside it)."""
from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions() -> dict:
    """gradpruner, torch, transformers, peft and Python versions, as written into scores.json,
    gradpruner.json and finetune.json."""
    import peft
    import torch
    import transformers

    return {"gradpruner": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}
