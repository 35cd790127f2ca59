"""Partial labels end to end: experiment=partial_quick trains on two phantom datasets that
annotate disjoint halves of the structures and is scored on fully labelled held-out phantoms,
against the same model trained for the same steps on fully labelled phantoms, run here too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import compose_in
from hydra.utils import instantiate
from lightning import Trainer
from omegaconf import DictConfig, open_dict

from ctseg.models.segresnet import SegResNetModule
from ctseg.training import train

pytestmark = pytest.mark.slow

# docs/training.md "Several datasets" and conf/experiment/partial_quick.yaml: mean Dice on
# phantom_quick's 3 fully labelled test phantoms, every structure scored.
PARTIAL_DICE = 0.70  # experiment=partial_quick (marginal loss, 1710 steps)
FULL_DICE = 0.66  # the same model and steps on fully labelled phantoms (FULLY_LABELLED)
FULLY_LABELLED = ("experiment=phantom_quick", "model.init_filters=8", "trainer.max_epochs=244")


def run(tmp_path: Path, name: str, *overrides: str
        ) -> tuple[dict[str, float], dict[str, Any], DictConfig]:
    """train.py with overrides in tmp_path/name, the phantoms shared in tmp_path/data: its
    metrics, objects and config."""
    cfg = compose_in(tmp_path / name, *overrides, "callbacks.progress_bar=null")
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
    return (*train(cfg), cfg)


def test_partial_quick_learns_every_structure_from_two_half_labelled_datasets(tmp_path):
    full_metrics, full, full_cfg = run(tmp_path, "full", *FULLY_LABELLED)
    assert full["trainer"].global_step == 244 * full["trainer"].num_training_batches == 1708
    metrics, objects, _ = run(tmp_path, "partial", "experiment=partial_quick")
    trainer = objects["trainer"]
    assert trainer.global_step == 114 * trainer.num_training_batches == 1710
    assert {"test/phantoms/mean_dice", "test/spine_lungs_vessels/mean_dice"} <= set(metrics)
    # Held out and fully labelled: phantom_quick's test phantoms (those the fully labelled run
    # tested on), every structure scored.
    model = SegResNetModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path,
                                                 weights_only=True)
    tester = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False)
    dice = tester.test(model, datamodule=instantiate(full_cfg.data), verbose=False)[0]
    structures = [k for k in dice if k.startswith("test/dice/")]
    assert len(structures) >= 17
    partial, fully = dice["test/mean_dice"], full_metrics["test/mean_dice"]
    figures = f"partial labels {partial:.3f}, fully labelled {fully:.3f}"
    assert partial == pytest.approx(PARTIAL_DICE, abs=0.05), figures
    assert fully == pytest.approx(FULL_DICE, abs=0.05), figures
    assert partial >= 0.9 * fully, figures
