"""Stage 1, score: the IGIA maths, gradient capture, the registry of layer-selection methods, sensitivity."""
