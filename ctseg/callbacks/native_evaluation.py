"""Test-time evaluation at native resolution: after `trainer.test`, every test subject predicted on
its own CT grid as predict.py would, scored with Dice and NSD and written to the run folder as
`python -m ctseg.evaluate` writes them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ctseg.evaluate.native import score_records
from ctseg.evaluate.report import markdown, summarise, write_outputs

log = logging.getLogger(__name__)


class NativeEvaluation(Callback):
    """At the end of the test epoch, score this rank's test subjects at native resolution, gather
    the rows over DDP ranks, write scores.csv, summary.json/.md and the plots to `output_dir`
    (rank 0) and log `test/native/mean_case_dice` and `test/native/mean_case_nsd`: means over
    cases (the resampled-grid `test/mean_dice` pools each class's voxels over cases)."""

    def __init__(self, output_dir: str | Path, tolerance_mm: float) -> None:
        """Remember where the outputs go and the NSD tolerance in mm."""
        self.output_dir = Path(output_dir)
        self.tolerance = float(tolerance_mm)
        self.summary: dict = {}

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Predict, score, gather, write and log."""
        datamodule = trainer.datamodule
        records = list(getattr(datamodule, "records", {}).get("test") or [])
        rows = score_records(pl_module, datamodule.pipeline, records, self.tolerance,
                             pl_module.device)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        if not rows:
            log.warning("native evaluation: no test subject to score")
            return
        if trainer.is_global_zero:
            self.summary = write_outputs(rows, self.output_dir, self.tolerance)
            log.info("native-resolution evaluation (%s):\n%s", self.output_dir,
                     markdown(self.summary, self.tolerance).split("\n\n")[0])
        else:
            self.summary = summarise(rows)
        overall = self.summary["overall"]
        for metric in ("dice", "nsd"):
            value = overall[metric]["mean"]
            if not math.isnan(value):
                pl_module.log(f"test/native/mean_case_{metric}", value, sync_dist=False)
