"""Model I/O: resolve a model argument, load it without running its code, find its decoder layers, attach LoRA."""
