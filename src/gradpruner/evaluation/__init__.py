"""Stage 5, evaluate: lm-eval-compatible log-likelihood scoring, generation metrics, the overlap guard."""
