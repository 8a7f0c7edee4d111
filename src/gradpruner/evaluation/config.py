"""The evaluate stage's settings: one field per setting, its default and help (CLI, YAML and API alike)."""
from __future__ import annotations

from dataclasses import dataclass

from gradpruner.util.options import opt


@dataclass
class EvalConfig:
    limit: int | None = opt(None, "evaluate the first K held-out items only (empty: all)")
    offset: int = opt(0, "skip the first N held-out items (a validation slice apart from the test one)")
    batch_size: int = opt(8, "questions scored together")
    metric: str | None = opt(None, "primary metric (empty: the task's own)")
    max_new_tokens: int | None = opt(None, "generation length for generative tasks (empty: the task's own)")
    max_length: int = opt(2048, "tokens per scored sequence, every task, at most the model's context length (longer "
                          "contexts and prompts lose their left end)")
    encoder: str | None = opt(None, "local encoder folder for BERTScore (empty: the packaged MiniLM)",
                              flag="--bertscore-encoder")
