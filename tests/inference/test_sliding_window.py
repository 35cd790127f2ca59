"""The memory-bounded slab aggregation equals MONAI's full-volume SlidingWindowInferer + argmax."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet

from ctseg.inference.aggregate import sliding_window_labels, sliding_window_predict

NUM_CLASSES = 13


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """A tiny random-weight SegResNet with enough classes to make ties negligible."""
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, init_filters=8,
                     blocks_down=(1, 1), blocks_up=(1,)).eval()


def _image(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A smooth random (1, 1, *shape) volume, so neighbouring windows see related content."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 1, *shape), generator=gen)
    return torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1)


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode", "slab_axis"),
    [
        ((40, 36, 28), (16, 16, 16), 0.25, "gaussian", None),
        ((37, 29, 23), (16, 12, 16), 0.5, "gaussian", 0),
        ((37, 29, 23), (16, 16, 8), 0.25, "gaussian", 2),
        ((33, 41, 19), (16, 16, 16), 0.0, "constant", 1),
        ((12, 30, 26), (16, 16, 16), 0.25, "gaussian", None),  # axis 0 shorter than the window
        ((30, 28, 26), (8, 16, 12), (0.3, 0.25, 0.6), "gaussian", None),
    ],
)
def test_labels_equal_full_volume_reference(net, shape, roi, overlap, mode, slab_axis) -> None:
    image = _image(shape, seed=sum(shape))
    with torch.no_grad():
        reference = SlidingWindowInferer(roi_size=roi, sw_batch_size=3, overlap=overlap,
                                         mode=mode)(image, net)
    expected = reference.argmax(1)[0]
    result = sliding_window_predict(image, net, roi, overlap, mode=mode, sw_batch_size=3,
                                    slab_axis=slab_axis, keep_channels=(0, 5))
    assert result.labels.shape == shape
    assert result.labels.dtype == torch.uint8
    agreement = (result.labels.long() == expected).float().mean().item()
    assert agreement >= 0.999, f"agreement {agreement:.5f}"
    assert len(expected.unique()) > 3  # the comparison is not between constant maps
    softmax = reference.softmax(1)[0]
    for c in (0, 5):
        torch.testing.assert_close(result.probabilities[c], softmax[c], atol=1e-4, rtol=1e-4)
    # The rolling accumulator spans one window along the slab axis, never the whole volume.
    axis = result.slab_axis
    padded = [max(s, r) for s, r in zip(shape, roi, strict=True)]
    assert result.accumulator_shape[:2] == (NUM_CLASSES, roi[axis])
    assert result.accumulator_bytes < NUM_CLASSES * torch.Size(padded).numel() * 4


def test_axis_zero_is_bit_identical(net) -> None:
    image = _image((34, 20, 20), seed=3)
    with torch.no_grad():
        reference = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25,
                                         mode="gaussian")(image, net).argmax(1)[0]
    labels = sliding_window_labels(image, net, 16, 0.25, sw_batch_size=2, slab_axis=0)
    assert torch.equal(labels.long(), reference)


def test_default_picks_the_smallest_accumulator(net) -> None:
    image = _image((20, 20, 48), seed=4)
    result = sliding_window_predict(image, net, 16, 0.25)
    assert result.slab_axis == 2
    assert result.accumulator_shape == (NUM_CLASSES, 16, 20, 20)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": torch.zeros(1, 8, 8, 8)}, r"shape \(1, C_in, D, H, W\)"),
        ({"roi_size": (8, 8)}, "roi_size must have 3 entries"),
        ({"overlap": 1.0}, "overlap must be >= 0 and < 1"),
        ({"mode": "median"}, "mode must be one of"),
        ({"sw_batch_size": 0}, "sw_batch_size must be >= 1"),
        ({"slab_axis": 3}, "slab_axis must be in"),
        ({"keep_channels": (NUM_CLASSES,)}, "keep_channels .* out of range"),
        ({"predictor": lambda x: x[:, :, :4]}, "predictor returned shape"),
    ],
)
def test_bad_arguments_are_named(net, kwargs, message) -> None:
    args = {"image": torch.zeros(1, 1, 12, 12, 12), "predictor": net, "roi_size": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sliding_window_predict(**args)


@pytest.mark.parametrize("padding_mode", ["replicate", "reflect"])
def test_padding_modes_equal_monai(net, padding_mode) -> None:
    # Thinner than the window along two axes: the padding decides what the windows see there.
    image = _image((10, 30, 12), seed=7) * 3 + torch.linspace(0, 4, 12)
    with torch.no_grad():
        reference = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25,
                                         mode="gaussian", padding_mode=padding_mode)(image, net)
    labels = sliding_window_labels(image, net, (16, 16, 16), 0.25, padding_mode=padding_mode)
    assert torch.equal(labels.long(), reference.argmax(1)[0])
    constant = sliding_window_labels(image, net, (16, 16, 16), 0.25)
    assert not torch.equal(constant, labels)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        sliding_window_labels(image, net, (16, 16, 16), 0.25, padding_mode="edge")
