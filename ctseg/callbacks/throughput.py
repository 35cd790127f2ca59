"""Training throughput in the logs: patches per second and the share of time spent waiting for data.

Lightning's ThroughputMonitor reports samples per second but not how long each step waited for
its batch, which is what tells a starving GPU (slow data) from a busy one.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class DataThroughput(L.Callback):
    """Logs per training epoch `perf/patches_per_s` (patches through the model per second of
    training), `perf/data_wait` (fraction of that time spent waiting for batches) and
    `perf/step_s` (mean seconds of a step, data excluded).

    The wait of a step runs from the end of the previous step (or the start of the epoch) to the
    start of this one; a step runs from its start to its end, after the optimiser step (CUDA work
    is waited for, so it is not counted as data wait of the next step).
    """

    def __init__(self) -> None:
        """Start with empty counters."""
        self._reset()

    def _reset(self) -> None:
        """Zero the epoch's counters."""
        self.wait = self.compute = 0.0
        self.patches = self.steps = 0
        self._mark = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start timing the epoch's first data wait."""
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """The batch has arrived: book the wait, start the step clock."""
        now = time.perf_counter()
        self.wait += now - self._mark
        self._mark = now
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        self.patches += int(image.shape[0])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """The step is done (CUDA work included): book the compute time."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self.compute += now - self._mark
        self.steps += 1
        self._mark = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's throughput and data-wait fraction."""
        total = self.wait + self.compute
        if not self.steps or total <= 0:
            return
        pl_module.log_dict({"perf/patches_per_s": self.patches / total,
                            "perf/data_wait": self.wait / total,
                            "perf/step_s": self.compute / self.steps}, sync_dist=True)
