"""Fixtures of the prediction tests: a tiny checkpoint and CT inputs made from the shared crop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_checkpoint as save_lightning_checkpoint
from helpers import write_dicom_series  # noqa: F401 - the tests here import it from conftest

from ctseg.labels import label_names
from ctseg.models.segresnet import SegResNetModule

# Small model grid (4 mm) and window so each prediction takes about a second on CPU.
SPACING, ROI = 4.0, (32, 32, 32)


def tiny_module(num_classes: int = 105, seed: int = 0) -> SegResNetModule:
    """A random-weight SegResNetModule with 8 initial filters (v1 names for 105 classes)."""
    torch.manual_seed(seed)
    names = label_names("v1") if num_classes == 105 else None
    return SegResNetModule(num_classes=num_classes, label_names=names, init_filters=8,
                           roi_size=ROI)


def save_checkpoint(module: SegResNetModule, path: Path, version: str = "v1") -> Path:
    """Write a Lightning-style checkpoint: state dict, module and datamodule hyper-parameters."""
    return save_lightning_checkpoint(module, path, {
        "version": version, "spacing": SPACING, "intensity": "segresnet", "patch_size": list(ROI)})


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a 105-class tiny checkpoint (4 mm, 32^3 windows)."""
    return save_checkpoint(tiny_module(), tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="session")
def shared_ct(shared_data: Path) -> Path:
    """The shared real CT crop (RAS, 3 mm, int16)."""
    return shared_data / "s0001" / "ct.nii.gz"
