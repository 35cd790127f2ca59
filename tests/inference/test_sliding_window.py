"""The memory-bounded slab aggregation equals MONAI's SlidingWindowInferer + argmax, and explicit
windows equal a plain blend of only those windows (MONAI's importance map)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import blend_windows
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet
from monai.transforms import SpatialPad

from ctseg.sliding_window import sliding_window_labels, sliding_window_predict

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


# Windows of the tiled CT below: shorter than half the volume along every axis.
ROI = (16, 12, 20)
CT_CLASSES = 6


@pytest.fixture(scope="module")
def tiled_ct(shared_ct) -> torch.Tensor:
    """The shared CT crop, every other voxel in-plane, tiled 3x along z: (1, 1, 61, 51, 90)."""
    ct = np.asarray(nib.load(shared_ct).dataobj, dtype=np.float32)[::2, ::2]
    return torch.from_numpy(np.tile(ct, (1, 1, 3)) / 1000)[None, None]


class WindowPredictor:
    """Random 3x3x3 convolution plus a ramp across the window (overlapping windows disagree)."""

    def __init__(self) -> None:
        """Seeded convolution and ramps."""
        torch.manual_seed(1)
        self.conv = torch.nn.Conv3d(1, CT_CLASSES, 3, padding=1)
        ramps = torch.meshgrid(*(torch.linspace(-1, 1, r) for r in ROI), indexing="ij")
        self.ramp = torch.einsum("ca,a...->c...", torch.randn(CT_CLASSES, 3), torch.stack(ramps))
        self.slope = torch.randn(CT_CLASSES, 1, 1, 1) / 50

    def __call__(self, windows: torch.Tensor, batch: list | None = None) -> torch.Tensor:
        """(B, C, *ROI) logits of a batch, plus a term of each window's z start if given."""
        with torch.no_grad():
            logits = self.conv(windows) + self.ramp
        if batch is not None:
            for out, window in zip(logits, batch, strict=True):
                out += self.slope * window[2][0]
        return logits


def _reference(image: torch.Tensor, predictor: WindowPredictor, starts: list, with_windows: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and softmax of the blend of only the windows at `starts`, 0 where none reaches."""
    def run(patch: torch.Tensor, coords: list) -> torch.Tensor:
        window = tuple((s.start, s.stop) for s in coords[0][2:])
        return predictor(patch, [window]) if with_windows else predictor(patch)

    logits = blend_windows(image, run, starts, ROI)
    covered = ~logits[0].isnan()
    logits = logits.nan_to_num(0.0)
    labels = torch.where(covered, logits.argmax(0), 0)
    return labels, torch.where(covered, logits.softmax(0), 0.0)


# Explicit windows (in padded-image voxels) on the tiled CT: overlapping pairs, a gap longer than
# a window and uncovered planes at both ends along every axis.
STARTS = [(3, 2, 1), (9, 6, 10), (42, 33, 55), (3, 33, 55), (42, 2, 10), (44, 34, 58)]


@pytest.mark.parametrize("slab_axis", [0, 1, 2])
@pytest.mark.parametrize("with_windows", [False, True])
def test_explicit_windows_blend_only_those_windows(tiled_ct, slab_axis, with_windows) -> None:
    predictor = WindowPredictor()
    result = sliding_window_predict(tiled_ct, predictor, ROI, 0.25, slab_axis=slab_axis,
                                    keep_channels=range(CT_CLASSES), window_starts=STARTS,
                                    with_windows=with_windows, sw_batch_size=4)
    labels, softmax = _reference(tiled_ct, predictor, STARTS, with_windows)
    covered = softmax.sum(0) > 0
    assert 0.05 < covered.float().mean() < 0.5
    for axis, (size, roi) in enumerate(zip(tiled_ct.shape[2:], ROI, strict=True)):
        planes = covered.movedim(axis, 0).flatten(1).any(1)
        first, last = planes.nonzero()[[0, -1], 0].tolist()
        assert first > 0 and last < size - 1 and size > 2 * roi
        assert int((~planes[first:last]).sum()) > roi  # a gap between windows
    assert result.num_windows == len(STARTS) and result.slab_axis == slab_axis
    assert len(labels[covered].unique()) == CT_CLASSES
    agreement = (result.labels.long() == labels).float().mean().item()
    assert agreement >= 0.9999, f"agreement {agreement:.6f}"
    assert not result.labels[~covered].any()
    for c in range(CT_CLASSES):
        torch.testing.assert_close(result.probabilities[c], softmax[c], atol=1e-5, rtol=1e-5)
        assert not result.probabilities[c][~covered].any()


@pytest.mark.parametrize(("crop", "padding_mode", "slab_axis"), [
    (None, "constant", None),
    (None, "constant", 0),
    (None, "constant", 1),
    (None, "constant", 2),
    (12, "replicate", None),  # thinner than a window along z: padded
    (12, "constant", 1),
])
def test_grid_windows_on_a_tiled_ct_equal_monai(tiled_ct, crop, padding_mode, slab_axis) -> None:
    image = tiled_ct[..., :crop]
    predictor = WindowPredictor()
    with torch.no_grad():
        reference = SlidingWindowInferer(ROI, sw_batch_size=3, overlap=0.25, mode="gaussian",
                                         padding_mode=padding_mode)(image, predictor)[0]
    result = sliding_window_predict(image, predictor, ROI, 0.25, sw_batch_size=3,
                                    slab_axis=slab_axis, padding_mode=padding_mode,
                                    keep_channels=(1, 4))
    assert result.labels.shape == image.shape[2:]
    assert len(reference.argmax(0).unique()) == CT_CLASSES
    if result.slab_axis == 0:
        assert torch.equal(result.labels.long(), reference.argmax(0))
    agreement = (result.labels.long() == reference.argmax(0)).float().mean().item()
    assert agreement >= 0.9999, f"agreement {agreement:.6f}"
    softmax = reference.softmax(0)
    for c in (1, 4):
        torch.testing.assert_close(result.probabilities[c], softmax[c], atol=1e-5, rtol=1e-5)


def test_explicit_windows_on_a_padded_image(tiled_ct) -> None:
    image = tiled_ct[..., :12]
    starts = [(3, 2, 0), (42, 33, 0), (45, 2, 0)]
    predictor = WindowPredictor()
    result = sliding_window_predict(image, predictor, ROI, window_starts=starts,
                                    padding_mode="replicate", keep_channels=(2,), slab_axis=0)
    padded = SpatialPad(ROI, mode="replicate")(image[0])[None]
    labels, softmax = _reference(padded, predictor, starts, with_windows=False)
    crop = (slice(None), slice(None), slice(4, 16))  # SpatialPad put 4 planes before z = 0
    assert len(labels[crop].unique()) == CT_CLASSES
    assert torch.equal(result.labels.long(), labels[crop])
    torch.testing.assert_close(result.probabilities[2], softmax[2][crop], atol=1e-5, rtol=1e-5)
