"""Inference: memory-bounded sliding-window aggregation and the `predict.py` pipeline (inputs,
checkpoint loading, per-case prediction, outputs, batch runner)."""
