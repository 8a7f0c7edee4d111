"""Stage 4, fine-tune: LoRA (merged into the weights) or full fine-tuning, optional distillation."""
