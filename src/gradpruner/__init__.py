"""gradpruner: prune a fine-tuned LLM for one downstream task with early LoRA gradients."""
__version__ = "0.1.0"
