"""Forgetting report for adding classes to a trained model: when `model.pretrained` is a ctseg
checkpoint whose classes are a subset of the run's, the test stage scores the old classes on the
test data with the model before (the checkpoint) and after training, per structure, and writes
`forgetting.json` and `forgetting.md` to the run folder."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ctseg.atomic import write_atomic
from ctseg.inference.outputs import write_json
from ctseg.models.base import PerClassDice, SegmentationModule
from ctseg.models.loading import module_class
from ctseg.models.weights import checkpoint_label_names, network_state_dict, read_checkpoint

log = logging.getLogger(__name__)

REPORT = "forgetting.json"
TABLE = "forgetting.md"


def forgetting_rows(names: Sequence[str], old: Sequence[int], before: torch.Tensor,
                    after: torch.Tensor) -> list[dict[str, Any]]:
    """Per old class with ground truth (index in `old`): its Dice before and after, and the
    change."""
    return [{"structure": names[c], "before": float(before[c]), "after": float(after[c]),
             "change": float(after[c] - before[c])}
            for c in old if not (math.isnan(before[c]) or math.isnan(after[c]))]


def forgetting_summary(rows: Sequence[Mapping[str, Any]], added: Sequence[str]
                       ) -> dict[str, Any]:
    """Means before and after over the old classes, the largest drop and which class, and the
    classes added."""
    if not rows:
        return {"old_classes": 0, "added": list(added), "structures": []}
    worst = min(rows, key=lambda r: r["change"])
    return {"old_classes": len(rows), "added": list(added),
            "mean_before": sum(r["before"] for r in rows) / len(rows),
            "mean_after": sum(r["after"] for r in rows) / len(rows),
            "max_drop": max(0.0, -worst["change"]), "max_drop_structure": worst["structure"],
            "structures": list(rows)}


def forgetting_markdown(summary: Mapping[str, Any]) -> str:
    """The report as a sentence and a table per old structure."""
    if not summary["structures"]:
        return "No old class has ground truth in the test data.\n"
    lines = [f"Added {', '.join(summary['added'])}; old classes' test Dice: mean "
             f"{summary['mean_before']:.4f} before, {summary['mean_after']:.4f} after; largest "
             f"drop {summary['max_drop']:.4f} ({summary['max_drop_structure']}).", "",
             "| structure | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| {r['structure']} | {r['before']:.4f} | {r['after']:.4f} | {r['change']:+.4f} |"
              for r in summary["structures"]]
    return "\n".join(lines) + "\n"


class ForgettingReport(Callback):
    """After the test stage of a run that added classes to a ctseg checkpoint (`pretrained`
    with fewer classes, all among the run's), the old classes' Dice before and after per
    structure, on the test data each sample's dataset annotates: written to
    `output_dir/forgetting.{json,md}` and logged as `test/forgetting/mean_before`,
    `.../mean_after` and `.../max_drop`. Runs without such a `pretrained` are left alone."""

    def __init__(self, output_dir: str | Path) -> None:
        """Remember where the report goes."""
        self.output_dir = Path(output_dir)
        self.before: SegmentationModule | None = None
        self.summary: dict[str, Any] = {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the checkpoint the run started from when it had fewer classes."""
        self.before = None
        source = pl_module.hparams.get("pretrained")
        if not source or not isinstance(pl_module, SegmentationModule):
            return
        checkpoint = read_checkpoint(source, "pretrained weights file")
        old = checkpoint_label_names(checkpoint)
        new = list(pl_module.label_names)
        if old is None or not set(old) < set(new):
            return
        cls = module_class(Path(source), checkpoint, network_state_dict(checkpoint, source))
        self.before = cls.load_from_checkpoint(source, map_location=pl_module.device,
                                               weights_only=True, pretrained=None,
                                               optimizer=None).eval()
        self.to_new = torch.tensor([new.index(n) for n in old], device=pl_module.device)
        self.old = [new.index(n) for n in old if n != new[0]]
        self.dice = {when: PerClassDice(len(new)).to(pl_module.device)
                     for when in ("before", "after")}
        log.info("forgetting report: %d old classes of %s scored before and after",
                 len(self.old), source)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Count the volume's Dice with the old model and with the trained one."""
        if self.before is None:
            return
        with torch.inference_mode():
            before = self.to_new[self.before.predict_labels(
                batch["image"].as_subclass(torch.Tensor)).long()]
        for when, pred in (("before", before), ("after", outputs["pred"])):
            self.dice[when].update(*pl_module.scored_pair(batch, pred))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write and log the report (the counts summed over DDP ranks)."""
        if self.before is None:
            return
        names = list(pl_module.label_names)
        before, after = (self.dice[when].compute() for when in ("before", "after"))
        added = [n for n in names[1:] if n not in self.before.label_names]
        self.summary = forgetting_summary(forgetting_rows(names, self.old, before, after), added)
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / REPORT, self.summary)
            write_atomic(self.output_dir / TABLE,
                         lambda tmp: tmp.write_text(forgetting_markdown(self.summary)))
            log.info("forgetting report (%s):\n%s", self.output_dir / TABLE,
                     forgetting_markdown(self.summary))
        if self.summary["structures"]:
            pl_module.log_dict({f"test/forgetting/{key}": self.summary[key]
                                for key in ("mean_before", "mean_after", "max_drop")},
                               sync_dist=True)
        self.before = None
