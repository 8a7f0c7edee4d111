"""gradpruner: prune a fine-tuned LLM for one downstream task with early LoRA gradients."""
from gradpruner.api import heal, plan, prune, score  # noqa: E402
from gradpruner.errors import GradPrunerError  # noqa: E402
from gradpruner.pipeline.search import search  # noqa: E402
from gradpruner.scoring.capture import IGIACallback  # noqa: E402
from gradpruner.util.versions import __version__

__all__ = ["score", "plan", "prune", "heal", "search", "IGIACallback", "GradPrunerError", "__version__"]
