"""gradpruner: prune a fine-tuned LLM for one downstream task with early LoRA gradients."""
__version__ = "0.1.0"

from gradpruner.api import plan, prune, score  # noqa: E402
from gradpruner.scoring.capture import IGIACallback  # noqa: E402
from gradpruner.errors import GradPrunerError  # noqa: E402

__all__ = ["score", "plan", "prune", "IGIACallback", "GradPrunerError", "__version__"]
