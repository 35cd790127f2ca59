"""Loading a Lightning checkpoint for prediction: the class it records is rebuilt by
`load_from_checkpoint`, with clear errors for checkpoints that cannot be."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_checkpoint
from monai.networks.nets import SegResNet

from ctseg.errors import CheckpointError, ConfigError, CtsegError, cli_message
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


def segresnet_state(out_channels: int = 105, in_channels: int = 1,
                    init_filters: int = 8) -> dict[str, torch.Tensor]:
    """A bundle-style state dict: a plain MONAI SegResNet's, seeded random weights."""
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                     init_filters=init_filters).state_dict()


BARE = {  # a bare state dict that does not fit predict.py's model config: (weights, error says)
    "another class count": (lambda: segresnet_state(out_channels=50),
                            "the weights have 50 output classes but the model config"),
    "another in_channels": (lambda: segresnet_state(in_channels=2),
                            "convInit.conv.weight (8, 2, 3, 3, 3) vs (8, 1, 3, 3, 3)"),
    "another width": (lambda: segresnet_state(init_filters=16),
                      "convInit.conv.weight (16, 1, 3, 3, 3) vs (8, 1, 3, 3, 3)"),
    "renamed keys": (lambda: {f"model.{k}": v for k, v in segresnet_state().items()},
                     "no SegResNet output layer (conv_final.2.*) in the weights"),
    "missing keys": (lambda: {k: v for k, v in segresnet_state().items()
                              if not k.startswith("up_layers.")},
                     "missing keys: up_layers."),
    "another network": (lambda: torch.nn.Linear(4, 2).state_dict(),
                        "no SegResNet output layer"),
    "a VISTA3D head without its encoder": (lambda: {"class_head.weight": torch.zeros(2)},
                                           "without the image encoder of vista3d132"),
    "not tensors": (lambda: {"state_dict": {"a": 1}}, "not a network state dict"),
}


@pytest.mark.parametrize("case", list(BARE))
def test_weights_that_do_not_fit_are_one_error_line_naming_the_file(case, tmp_path: Path):
    weights, says = BARE[case]
    path = tmp_path / "model.pt"
    torch.save(weights(), path)
    with pytest.raises(CtsegError) as err:
        load_model(path, {"num_classes": 105, "init_filters": 8}, {"version": "v1"})
    message = cli_message(err.value)
    assert message is not None and message.startswith(f"{path}: ") and says in message, message


def test_a_bare_state_dict_without_a_class_table_is_refused(tmp_path: Path):
    path = tmp_path / "model.pt"
    torch.save(segresnet_state(out_channels=50), path)
    with pytest.raises(ConfigError, match=r"data\.version=null: a bare SegResNet state dict"):
        load_model(path, {"num_classes": 50, "init_filters": 8}, {"version": None})


def test_a_checkpoint_whose_head_disagrees_with_its_classes_is_refused(segresnet, tmp_path: Path):
    path = save_checkpoint(segresnet, tmp_path / "a.ckpt", DATA)
    checkpoint = torch.load(path, weights_only=True)
    for key in ("net.conv_final.2.conv.weight", "net.conv_final.2.conv.bias"):
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:50]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"a\.ckpt: the weights have 50 output classes but "
                                               "the checkpoint's hyper_parameters expect 105"):
        load_model(path, {}, {})


# A module that records its import: a checkpoint naming a class of it must be refused unread.
PROBE = '''
from pathlib import Path
from ctseg.models.segresnet import SegResNetModule

Path(__file__).with_name("imported").write_text("imported")


class Probe(SegResNetModule):
    """A SegmentationModule outside ctseg.models."""
'''


@pytest.mark.parametrize("name", ["ctseg_probe.Probe", "os.system", "builtins.eval",
                                  "ctseg.models.segresnet.os.system", "ctseg.modelsx.a.B",
                                  "ctseg.models.segresnet"])
def test_a_class_outside_ctseg_models_is_refused_before_any_import(
        segresnet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "ctseg_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path / "probe"))
    path = save_checkpoint(segresnet, tmp_path / "a.ckpt", DATA)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["ctseg_module_class"] = name
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=rf"a\.ckpt: its module class {re.escape(name)} is "
                                              r"not a ctseg model class \(ctseg\.models\.") as err:
        load_model(path, {}, {})
    assert cli_message(err.value) == str(err.value)  # the command line's one error line
    assert not (tmp_path / "probe" / "imported").exists()
    assert "ctseg_probe" not in sys.modules
