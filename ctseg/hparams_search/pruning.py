"""Report the optimized metric to Optuna after every validation and stop pruned trials."""

from __future__ import annotations

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback


class OptunaPruning(Callback):
    """After each validation, report `monitor` at the epoch to `trial`; raise TrialPruned when
    the study's pruner says so (the trial ends, its checkpoints and logs stay)."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        """Follow `monitor` for `trial`."""
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report and maybe prune (not during the sanity check)."""
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned at epoch {epoch}: "
                                     f"{self.monitor}={float(value):.4f}")
