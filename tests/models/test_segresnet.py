"""SegResNetModule: the bundle's architecture, forward and sliding-window shapes, training step."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SegResNet

from ctseg.labels import label_names, num_classes
from ctseg.models.segresnet import SegResNetModule


def small(**kwargs) -> SegResNetModule:
    """A 4-class SegResNet with 8 filters and 16^3 windows."""
    torch.manual_seed(0)
    return SegResNetModule(**{"num_classes": 4, "init_filters": 8, "roi_size": (16, 16, 16),
                              "dropout_prob": None, **kwargs})


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_default_architecture_is_the_bundle_segresnet(version):
    module = SegResNetModule(num_classes=num_classes(version), label_names=label_names(version))
    bundle = SegResNet(spatial_dims=3, in_channels=1, out_channels=num_classes(version),
                       init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
                       dropout_prob=0.2)
    ours = {k: v.shape for k, v in module.net.state_dict().items()}
    assert ours == {k: v.shape for k, v in bundle.state_dict().items()}
    assert ours["conv_final.2.conv.weight"] == (num_classes(version), 32, 1, 1, 1)
    assert module.label_names[:2] == ["background", "spleen"]
    hp = module.hparams
    assert (hp.roi_size, hp.sw_overlap, hp.sw_mode) == ([96, 96, 96], 0.25, "gaussian")


def test_instance_norm_keeps_the_bundle_keys():
    bundle = SegResNetModule(init_filters=8)
    instance = SegResNetModule(init_filters=8, norm=["INSTANCE", {"affine": True}])
    norms = {type(m).__name__ for m in instance.net.modules() if "Norm" in type(m).__name__}
    assert norms == {"InstanceNorm3d"}
    assert {type(m).__name__ for m in bundle.net.modules() if "Norm" in type(m).__name__} == {
        "GroupNorm"}
    # Same parameter names and shapes: the weights move between the two unchanged.
    assert {k: v.shape for k, v in instance.net.state_dict().items()} == {
        k: v.shape for k, v in bundle.net.state_dict().items()}
    assert instance.hparams.norm == ["INSTANCE", {"affine": True}]


def test_bundle_forward_shape():
    module = SegResNetModule().eval()
    with torch.no_grad():
        logits = module(torch.randn(1, 1, 32, 32, 32))
    assert logits.shape == (1, 105, 32, 32, 32) and logits.dtype == torch.float32


def test_forward_and_sliding_window_shapes():
    module = small().eval()
    with torch.no_grad():
        assert module(torch.randn(2, 1, 16, 16, 32)).shape == (2, 4, 16, 16, 32)
        # Not a multiple of the window, and smaller than it along the last axis.
        labels = module.predict_labels(torch.randn(1, 1, 40, 23, 9))
    assert labels.shape == (40, 23, 9) and labels.dtype == torch.uint8


def test_single_window_inference_equals_forward():
    module = small().eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(module.predict_labels(image).long(), module(image).argmax(1)[0])


def test_training_step_gives_a_differentiable_loss():
    module = small()
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": torch.randint(4, (2, 1, 16, 16, 16))}
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert module.net.conv_final[2].conv.weight.grad.abs().sum() > 0
