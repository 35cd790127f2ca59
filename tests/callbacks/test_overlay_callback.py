"""ValidationOverlays in real Lightning runs: PNG files beside the CSV logger, images in
TensorBoard's event files, W&B images, every n-th validation only."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from monai.data import DataLoader, MetaTensor
from torch.utils.data import Dataset

from ctseg.callbacks.overlays import TAG, ValidationOverlays, batch_case_name, voxel_spacing
from ctseg.colours import label_colours
from ctseg.errors import ConfigError
from ctseg.models.segresnet import SegResNetModule
from ctseg.visualize.overlay import render_overlay

NAMES = ["background", "liver", "spleen"]


class Volumes(Dataset):
    """`n` 16x16x16 volumes of 2 x 2 x 3 mm: a bright cube (liver) and a bar (spleen)."""

    def __init__(self, n: int) -> None:
        """`n` volumes named case_0, case_1, ..."""
        self.n = n

    def __len__(self) -> int:
        """Number of volumes."""
        return self.n

    def __getitem__(self, index: int) -> dict:
        """One volume with its label map, spacing in the affine and its subject id."""
        label = torch.zeros((1, 16, 16, 16), dtype=torch.uint8)
        label[0, 3:9, 4:10, 3:8] = 1
        label[0, 11:14, 2:14, 5:7] = 2
        image = label.float() + 0.1 * torch.randn((1, 16, 16, 16),
                                                  generator=torch.Generator().manual_seed(index))
        affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
        return {"image": MetaTensor(image, affine=affine),
                "label": MetaTensor(label, affine=affine), "subject": f"case_{index}"}


def _fit(tmp_path: Path, loggers: list, callback: ValidationOverlays, epochs: int = 1,
         volumes: int = 3) -> None:
    """Train a tiny 3-class SegResNet for `epochs` of one batch, validating `volumes` each."""
    torch.manual_seed(0)
    module = SegResNetModule(num_classes=3, label_names=NAMES, init_filters=8,
                             roi_size=(16, 16, 16), sw_batch_size=1, dropout_prob=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=loggers,
                        default_root_dir=tmp_path, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_train_batches=1, num_sanity_val_steps=1, callbacks=[callback])
    trainer.fit(module, DataLoader(Volumes(2), batch_size=2),
                DataLoader(Volumes(volumes), batch_size=1))


def test_csv_and_tensorboard_get_overlays_of_the_first_cases(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv = CSVLogger(tmp_path, name="csv")
    board = TensorBoardLogger(tmp_path / "tensorboard", name=None, default_hp_metric=False)
    _fit(tmp_path, [csv, board], ValidationOverlays(max_cases=2))
    pngs = sorted(p.name for p in (Path(csv.log_dir) / "overlays").iterdir())
    assert pngs == ["epoch_000_case_0.png", "epoch_000_case_1.png"]  # no sanity-check overlay
    image = plt.imread(Path(csv.log_dir) / "overlays" / pngs[0])[..., :3]
    assert image.std() > 0.05
    # The legend patches carry the exact label colours of the Slicer / ITK-SNAP tables.
    for colour in label_colours(NAMES)[1:]:
        assert (np.abs(image - np.array(colour) / 255).max(axis=-1) < 1.5 / 255).sum() > 20
    events = EventAccumulator(board.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [f"{TAG}/case_0", f"{TAG}/case_1"]
    logged = events.Images(f"{TAG}/case_0")[0]
    assert logged.step == 1 and logged.width > 500 and logged.height > 200


def test_every_n_validations_and_no_logger(tmp_path):
    _fit(tmp_path, [], ValidationOverlays(max_cases=1, every_n_validations=2), epochs=3,
         volumes=1)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [
        "epoch_000_case_0.png", "epoch_002_case_0.png"]


def test_wandb_gets_the_image(tmp_path):
    wandb = mock.create_autospec(WandbLogger, instance=True)
    trainer = mock.Mock(loggers=[wandb], global_step=7, current_epoch=1,
                        default_root_dir=tmp_path)
    volume = np.zeros((8, 8, 8), dtype=np.uint8)
    volume[2:5, 2:5, 2:5] = 1
    figure = render_overlay(volume.astype(np.float32), {"ground truth": volume}, (1, 1, 1), NAMES)
    ValidationOverlays().log_figure(trainer, figure, "case_0")
    kwargs = wandb.log_image.call_args.kwargs
    assert (kwargs["key"], kwargs["step"]) == (f"{TAG}/case_0", 7)
    rgb = kwargs["images"][0]
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 10
    assert not list(tmp_path.iterdir())


def test_settings_are_checked_at_construction():
    with pytest.raises(ConfigError, match="window=soft: unknown preset"):
        ValidationOverlays(window="soft")
    with pytest.raises(ConfigError, match=r"overlays\.alpha=2: give an opacity in 0\.\.1"):
        ValidationOverlays(alpha=2)
    with pytest.raises(ConfigError, match="every_n_validations >= 1, got 2 and 0"):
        ValidationOverlays(every_n_validations=0)


def test_case_names_and_spacing():
    assert batch_case_name({"subject": ["s0001/a b"]}, 3) == "s0001_a_b"
    assert batch_case_name({}, 3) == "case3"
    affine = torch.tensor([[[0.0, 0, -1.5, 0], [2, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 1]]])
    assert voxel_spacing(MetaTensor(torch.zeros(1, 1, 2, 2, 2), affine=affine)) == (2, 3, 1.5)
    assert voxel_spacing(torch.zeros(2, 2, 2)) == (1, 1, 1)
