"""Stage 3b, heal: fold a linear map into the layer before each cut (ReplaceMe, arXiv 2505.02819)."""
