"""Loading a Lightning checkpoint for prediction: the class it records is rebuilt by
`load_from_checkpoint`, with clear errors for checkpoints that cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_checkpoint

from ctseg.errors import CheckpointError
from ctseg.labels import label_names
from ctseg.models.loading import load_model
from ctseg.models.segresnet import SegResNetModule
from ctseg.models.vista3d import VISTA3DModule

DATA = {"version": "v1", "spacing": 4.0, "intensity": "segresnet", "patch_size": [32, 32, 32]}


@pytest.fixture(scope="module")
def segresnet() -> SegResNetModule:
    """A slim 105-class SegResNet with random weights."""
    torch.manual_seed(0)
    return SegResNetModule(num_classes=105, label_names=label_names("v1"), init_filters=8,
                           roi_size=(32, 32, 32), sw_batch_size=2)


def test_the_recorded_class_is_rebuilt_with_its_weights_and_window(segresnet, tmp_path: Path):
    path = save_checkpoint(segresnet, tmp_path / "a.ckpt", DATA)
    model = load_model(path, {}, {})
    assert model.kind == "segresnet" and model.label_names == label_names("v1")
    assert model.roi_size == (32, 32, 32) and model.pipeline.spacing == (4.0, 4.0, 4.0)
    assert not model.net.training
    for key, value in segresnet.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_a_vista3d_checkpoint_answers_with_its_vista3d_ids(tmp_path: Path):
    module = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                           roi_size=(32, 32, 32))
    model = load_model(save_checkpoint(module, tmp_path / "v.ckpt", DATA), {}, {})
    assert model.kind == "vista3d" and model.known_ids == sorted(module.prompt_ids.tolist())


def test_a_class_that_cannot_be_imported_is_named(segresnet, tmp_path: Path):
    path = save_checkpoint(segresnet, tmp_path / "a.ckpt", DATA)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["ctseg_module_class"] = "ctseg.models.gone.GoneModule"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="GoneModule cannot be imported"):
        load_model(path, {}, {})


def test_hyper_parameters_not_written_by_lightning_are_refused(segresnet, tmp_path: Path):
    path = tmp_path / "by_hand.ckpt"
    torch.save({"state_dict": segresnet.state_dict(), "hyper_parameters": dict(segresnet.hparams)},
               path)
    with pytest.raises(CheckpointError, match="not written by Lightning"):
        load_model(path, {}, {})
