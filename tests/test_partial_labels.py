"""Partial labels end to end: experiment=partial_quick trains on two phantom datasets that
annotate disjoint halves of the structures and is scored on fully labelled held-out phantoms."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from lightning import Trainer

from ctseg.models.segresnet import SegResNetModule
from ctseg.training import train

pytestmark = pytest.mark.slow


def test_partial_quick_learns_every_structure_from_two_half_labelled_datasets(compose_cfg):
    metrics, objects = train(compose_cfg("experiment=partial_quick",
                                         "callbacks.progress_bar=null"))
    trainer = objects["trainer"]
    assert trainer.global_step == 114 * trainer.num_training_batches == 1710
    assert {"test/phantoms/mean_dice", "test/spine_lungs_vessels/mean_dice"} <= set(metrics)
    # Held out and fully labelled: phantom_quick's test phantoms, every structure scored.
    full = compose_cfg("experiment=phantom_quick")
    model = SegResNetModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path,
                                                 weights_only=True)
    tester = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False)
    dice = tester.test(model, datamodule=instantiate(full.data), verbose=False)[0]
    structures = [k for k in dice if k.startswith("test/dice/")]
    assert len(structures) >= 17
    # Measured: 0.70; the same model and steps on fully labelled phantoms 0.66 (0.9x: 0.59).
    assert dice["test/mean_dice"] >= 0.59
