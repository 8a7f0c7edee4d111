"""Task data: the built-in tasks (formats, splits), generic JSONL, tokenisation with completion-only loss."""
