"""Optuna hyper-parameter search over train.py runs, with pruning and a persistent study."""
