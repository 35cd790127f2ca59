"""Inference utilities: memory-bounded sliding-window aggregation to label maps."""
