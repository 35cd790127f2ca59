"""Skipping the windows that lie in air (`sw.skip_air`): which windows, and unchanged labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import scanner_ct
from monai.transforms import LoadImage, Orientation, Spacing

from ctseg.data.transforms import AXIS_LABELS
from ctseg.inference.air import AIR_HU, body_window_starts
from ctseg.sliding_window import grid_windows, sliding_window_predict

ROI = (32, 32, 16)


def threshold_net(image: torch.Tensor) -> torch.Tensor:
    """Two-class logits: class 1 where the (HU) image is above -300, the same in every window."""
    return torch.cat([-300.0 - image, image + 300.0], dim=1)


def test_windows_in_air_are_skipped_and_labels_unchanged(shared_ct: Path, tmp_path: Path):
    ct = scanner_ct(shared_ct, tmp_path / "ct.nii.gz")
    loaded = LoadImage(image_only=True)(str(ct))
    # The model grid: RAS at 4.5 mm (MONAI's own transforms), its voxels mapped by its affine.
    grid = Spacing(pixdim=4.5)(Orientation(axcodes="RAS", labels=AXIS_LABELS)(loaded[None]))
    starts, total = body_window_starts(loaded.numpy(), np.asarray(loaded.affine),
                                       np.asarray(grid.affine), grid.shape[1:], ROI, 0.25)
    padded = [max(s, r) for s, r in zip(grid.shape[1:], ROI, strict=True)]
    assert total == len(grid_windows(padded, ROI, 0.25))
    assert 0 < len(starts) < total
    # A skipped window holds no voxel above the air threshold on the model grid either.
    image = grid[None].as_tensor().float()
    for window in grid_windows(image.shape[2:], ROI, 0.25):
        if tuple(a for a, _ in window) not in starts:
            assert float(image[(0, 0, *(slice(a, b) for a, b in window))].max()) <= AIR_HU
    full = sliding_window_predict(image, threshold_net, ROI, 0.25).labels
    skipped = sliding_window_predict(image, threshold_net, ROI, 0.25, window_starts=starts)
    assert skipped.num_windows == len(starts)
    assert int(full.sum()) > 0
    assert torch.equal(skipped.labels, full)


def test_a_ct_of_body_only_keeps_every_window(shared_ct: Path):
    loaded = LoadImage(image_only=True)(str(shared_ct))
    grid = Spacing(pixdim=3.0)(Orientation(axcodes="RAS", labels=AXIS_LABELS)(loaded[None]))
    starts, total = body_window_starts(loaded.numpy(), np.asarray(loaded.affine),
                                       np.asarray(grid.affine), grid.shape[1:], ROI, 0.25)
    assert len(starts) == total
