"""What pruning buys: parameters, FLOPs, latency and memory, measured side by side."""
