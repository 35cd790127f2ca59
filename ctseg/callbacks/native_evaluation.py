"""Test-time evaluation at native resolution: after `trainer.test`, every test subject predicted on
its own CT grid as predict.py would, scored with Dice and NSD and written to the run folder as
`python -m ctseg.evaluate` writes them."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ctseg.atomic import make_folder
from ctseg.data.transforms import LABEL
from ctseg.errors import ConfigError
from ctseg.evaluate.native import GROUND_TRUTH, PREDICTIONS, record_case, score_records
from ctseg.evaluate.report import markdown, summarise, write_outputs
from ctseg.inference.outputs import write_json

log = logging.getLogger(__name__)


class NativeEvaluation(Callback):
    """At the end of the test epoch (the best checkpoint), score this rank's subjects of each of
    `splits` at native resolution, gather the rows over DDP ranks, write scores.csv,
    summary.json/.md and the plots (rank 0) to `output_dir` for the test split and to
    `output_dir/<split>` for the others, and log `<split>/native/mean_case_dice` and
    `.../mean_case_nsd`: means over cases (the resampled-grid `test/mean_dice` pools each class's
    voxels over cases), with several datasets also `<split>/native/<dataset>/mean_dice` (each
    dataset on the classes it annotates). The val split of a cross-validation fold gives its
    out-of-fold scores, which `python -m ctseg.evaluate cv=<multirun>` pools; `keep_predictions`
    keeps the label maps (`<folder>/predictions/<case>.nii.gz`)."""

    def __init__(self, output_dir: str | Path, tolerance_mm: float,
                 splits: Sequence[str] = ("test",), keep_predictions: bool = False) -> None:
        """Remember where the outputs go, the NSD tolerance in mm and what to score and keep."""
        unknown = sorted(set(splits) - {"val", "test"})
        if unknown or not splits:
            raise ConfigError(f"callbacks.native_evaluation.splits={list(splits)}: choose among "
                              "val and test")
        self.output_dir = Path(output_dir)
        self.tolerance = float(tolerance_mm)
        self.splits, self.keep_predictions = list(splits), bool(keep_predictions)
        self.summary: dict = {}

    def folder(self, split: str) -> Path:
        """Where the outputs of `split` go."""
        return self.output_dir if split == "test" else self.output_dir / split

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score each split."""
        for split in self.splits:
            self.score(trainer, pl_module, split)

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        """Predict, score, gather, write and log one split."""
        datamodule = trainer.datamodule
        if split not in getattr(datamodule, "records", {}) and hasattr(datamodule, "setup"):
            datamodule.setup("validate" if split == "val" else "test")
        records = list(getattr(datamodule, "records", {}).get(split) or [])
        keep = self.folder(split) / PREDICTIONS if self.keep_predictions else None
        rows = score_records(pl_module, datamodule.pipeline, records, self.tolerance,
                             pl_module.device, predictions=keep)
        truth = {record_case(r): str(r[LABEL]) for r in records}
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, (rows, truth))
            rows = [row for part, _ in parts for row in part]
            truth = {case: label for _, part in parts for case, label in part.items()}
        if keep is not None and trainer.is_global_zero and truth:
            write_json(make_folder(keep) / GROUND_TRUTH, truth)
        if not rows:
            log.warning("native evaluation: no %s subject to score", split)
            return
        if trainer.is_global_zero:
            summary = write_outputs(rows, self.folder(split), self.tolerance)
            log.info("native-resolution evaluation of %s (%s):\n%s", split, self.folder(split),
                     markdown(summary, self.tolerance).split("\n\n")[0])
        else:
            summary = summarise(rows)
        if split == "test":
            self.summary = summary
        overall = summary["overall"]
        values = {f"{split}/native/mean_case_{metric}": overall[metric]["mean"]
                  for metric in ("dice", "nsd")}
        datasets = summary.get("datasets", {})
        if len(datasets) > 1:
            values.update((f"{split}/native/{name}/mean_{metric}", scores[metric]["mean"])
                          for name, scores in datasets.items() for metric in ("dice", "nsd"))
        for key, value in values.items():
            if not math.isnan(value):
                pl_module.log(key, value, sync_dist=False)
