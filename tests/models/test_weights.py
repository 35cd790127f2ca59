"""Bundle weights: MONAI SegResNet state dicts in, identical tensors out, clear errors otherwise."""

from __future__ import annotations

import io
import re
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from monai.networks.nets import SegResNet

from ctseg.errors import CheckpointError
from ctseg.models.segresnet import SegResNetModule
from ctseg.models.weights import (
    SEGRESNET_HEAD,
    UNREADABLE,
    bundle_state_dict,
    load_bundle_state_dict,
    load_into,
    read_checkpoint,
    save_bundle_state_dict,
)

# The wholeBody_ct_segmentation bundle's network arguments (configs/train.json).
BUNDLE_ARGS = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32,
               "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout_prob": 0.2}


def bundle_net(out_channels: int = 105, seed: int = 0) -> SegResNet:
    """A plain MONAI SegResNet with the bundle's arguments and seeded random weights."""
    torch.manual_seed(seed)
    return SegResNet(out_channels=out_channels, **BUNDLE_ARGS)


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bundle-style `model.pt` (plain 105-class state dict) and the state dict it holds."""
    state = bundle_net().state_dict()
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    torch.save(state, path)
    return path, state


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same key set and bit-identical tensors."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def lightning_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """Write a real Lightning checkpoint of `module` (no training) to `path`."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_bundle_model_pt_round_trips_through_the_module(bundle_file, tmp_path):
    path, state = bundle_file
    module = SegResNetModule(pretrained=path)
    assert_same_state(bundle_state_dict(module), state)
    out = save_bundle_state_dict(module, tmp_path / "models" / "model.pt")
    assert_same_state(torch.load(out, weights_only=True), state)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]
    net = bundle_net(seed=1)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert_same_state(net.state_dict(), state)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_wrapped_state_dict_loads(bundle_file, tmp_path, key):
    _, state = bundle_file
    wrapped = tmp_path / "wrapped.pt"
    torch.save({key: state, "epoch": 3}, wrapped)
    assert_same_state(load_bundle_state_dict(wrapped), state)
    assert_same_state(bundle_state_dict(SegResNetModule(pretrained=wrapped)), state)


def test_lightning_checkpoint_loads_without_net_prefix(bundle_file, tmp_path):
    path, state = bundle_file
    ckpt = lightning_checkpoint(SegResNetModule(pretrained=path), tmp_path / "run.ckpt")
    raw = torch.load(ckpt, weights_only=True)
    assert set(raw["state_dict"]) == {f"net.{k}" for k in state}
    assert raw["hyper_parameters"]["pretrained"] is None
    assert_same_state(load_bundle_state_dict(ckpt), state)
    assert_same_state(bundle_state_dict(SegResNetModule(pretrained=ckpt)), state)


def test_class_count_mismatch_names_reinit_head(bundle_file):
    path, _ = bundle_file
    with pytest.raises(ValueError, match="reinit_head") as err:
        SegResNetModule(num_classes=118, pretrained=path)
    assert str(path) in str(err.value)
    assert "105 output classes" in str(err.value) and "118" in str(err.value)


def test_reinit_head_loads_everything_but_the_output_layer(bundle_file):
    path, state = bundle_file
    torch.manual_seed(7)
    fresh = SegResNetModule(num_classes=118)
    torch.manual_seed(7)
    module = SegResNetModule(num_classes=118, pretrained=path, reinit_head=True)
    loaded = bundle_state_dict(module)
    head = {k for k in loaded if k.startswith(SEGRESNET_HEAD)}
    assert head == {"conv_final.2.conv.weight", "conv_final.2.conv.bias"}
    assert_same_state({k: v for k, v in loaded.items() if k not in head},
                      {k: v for k, v in state.items() if k not in head})
    assert loaded["conv_final.2.conv.weight"].shape[0] == 118
    assert_same_state({k: loaded[k] for k in head},
                      {k: v for k, v in bundle_state_dict(fresh).items() if k in head})


def test_reinit_head_with_matching_classes_keeps_fresh_head(bundle_file):
    path, state = bundle_file
    loaded = bundle_state_dict(SegResNetModule(pretrained=path, reinit_head=True))
    assert torch.equal(loaded["conv_final.0.weight"], state["conv_final.0.weight"])
    assert not torch.equal(loaded["conv_final.2.conv.weight"], state["conv_final.2.conv.weight"])


def test_other_architecture_is_refused_with_key_names(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(SegResNet(spatial_dims=3, in_channels=1, out_channels=105, init_filters=16,
                         blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit the network architecture") as err:
        SegResNetModule(pretrained=path, reinit_head=True)
    assert str(path) in str(err.value) and "convInit.conv.weight" in str(err.value)


def test_missing_and_unexpected_keys_are_listed(bundle_file, tmp_path):
    _, state = bundle_file
    net = bundle_net()
    partial = {k: v for k, v in state.items() if k != "convInit.conv.weight"}
    with pytest.raises(ValueError, match=r"missing keys: convInit\.conv\.weight"):
        load_into(net, partial, source="partial.pt")
    extra = {**state, "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"partial\.pt: .*unexpected keys: extra\.weight"):
        load_into(net, extra, source="partial.pt")


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found") as err:
        SegResNetModule(pretrained=path)
    assert str(path) in str(err.value)


def test_corrupt_file_names_the_path(bundle_file, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bundle_file[0].read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable PyTorch file") as err:
        load_bundle_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [{"epoch": 3, "lr": 0.1}, [torch.zeros(2)], {}])
def test_file_without_tensors_is_not_a_state_dict(tmp_path, content):
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a network state dict") as err:
        load_bundle_state_dict(path)
    assert str(path) in str(err.value)


def test_pickled_module_is_refused_with_advice(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="re-save only the network's state dict") as err:
        load_bundle_state_dict(path)
    assert str(path) in str(err.value)


def test_a_checkpoint_gains_classes_keeping_its_own_output_weights(tmp_path):
    old_names = ["background", "liver", "spleen"]
    torch.manual_seed(0)
    old = SegResNetModule(num_classes=3, label_names=old_names, init_filters=8)
    ckpt = lightning_checkpoint(old, tmp_path / "old.ckpt")
    new_names = ["background", "spleen", "liver_tumour", "liver"]
    new = SegResNetModule(num_classes=4, label_names=new_names, init_filters=8,
                          pretrained=str(ckpt))
    fresh = SegResNetModule(num_classes=4, label_names=new_names, init_filters=8)
    theirs, ours = old.net.state_dict(), new.net.state_dict()
    for key, value in ours.items():
        if not key.startswith(SEGRESNET_HEAD):
            assert torch.equal(value, theirs[key]), key
            continue
        for row, name in enumerate(new_names):
            if name in old_names:
                assert torch.equal(value[row], theirs[key][old_names.index(name)]), (key, name)
            else:  # the new class keeps a fresh initialisation, not a copy of another class
                assert value[row].shape == fresh.net.state_dict()[key][row].shape
                assert not any(torch.equal(value[row], theirs[key][i]) for i in range(3))
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():  # the old classes' logits are unchanged
        assert torch.allclose(new.eval()(image)[:, [0, 1, 3]], old.eval()(image)[:, [0, 2, 1]],
                              atol=1e-5)
    with pytest.raises(ValueError, match="3 output classes but the model has 2"):
        SegResNetModule(num_classes=2, label_names=["background", "aorta"], init_filters=8,
                        pretrained=str(ckpt))


def damaged_checkpoints(legacy: bool) -> Iterator[bytes]:
    """A small checkpoint (the zip format, or the legacy one of torch.save before 1.6) cut at
    32 lengths, then (zip) with each byte of its pickle in turn replaced by the opcodes BININT
    (J) and BININT1 (K): what an interrupted copy or a damaged disk leaves."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(32, 32)}, buffer, _use_new_zipfile_serialization=not legacy)
    data = buffer.getvalue()
    for cut in np.linspace(0, len(data) - 1, 32).astype(int):
        yield data[:cut]
    if legacy:
        return
    with zipfile.ZipFile(buffer) as archive:
        pickle = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    name, extra = struct.unpack("<HH", data[pickle.header_offset + 26:pickle.header_offset + 30])
    start = pickle.header_offset + 30 + name + extra  # after the member's local file header
    for i in range(start, start + pickle.file_size):
        for opcode in b"JK":
            yield data[:i] + bytes([opcode]) + data[i + 1:]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_damaged_checkpoint_is_named_unreadable(tmp_path, legacy):
    path = tmp_path / "model.ckpt"
    raised = set()
    for data in damaged_checkpoints(legacy):
        path.write_bytes(data)
        for mmap in (True, False):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as err:
                raised.add(type(err))
                with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: "):
                    read_checkpoint(path, mmap=mmap)
    if not legacy:  # each error type read_checkpoint names unreadable, met by a damaged file
        assert {next(t for t in UNREADABLE if issubclass(r, t)) for r in raised} == set(
            UNREADABLE), raised

