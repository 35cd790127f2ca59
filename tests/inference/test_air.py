"""Skipping the windows that lie in air (`sw.skip_air`): which windows, and unchanged labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from helpers import scanner_ct
from monai.transforms import LoadImage, Orientation, Spacing

from ctseg.data.transforms import AXIS_LABELS
from ctseg.inference.air import AIR_HU, body_mask, body_window_starts
from ctseg.inference.runner import run as predict
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
    starts, total = body_window_starts(body_mask(loaded.numpy()), np.asarray(loaded.affine),
                                       np.asarray(grid.affine), grid.shape[1:], ROI, 0.25)
    padded = [max(s, r) for s, r in zip(grid.shape[1:], ROI, strict=True)]
    assert total == len(grid_windows(padded, ROI, 0.25))
    assert 0 < len(starts) < total
    # Windows of MONAI's grid, covering every voxel of the body on the model grid (resampled by
    # MONAI); a skipped window holds none.
    assert set(starts) < {tuple(a for a, _ in w) for w in grid_windows(padded, ROI, 0.25)}
    image = grid[None].as_tensor().float()
    covered = torch.zeros(image.shape[2:], dtype=torch.bool)
    for start in starts:
        covered[tuple(slice(a, a + r) for a, r in zip(start, ROI, strict=True))] = True
    assert bool(covered[image[0, 0] > AIR_HU].all())
    assert not bool(covered.all())
    full = sliding_window_predict(image, threshold_net, ROI, 0.25).labels
    skipped = sliding_window_predict(image, threshold_net, ROI, 0.25, window_starts=starts)
    assert skipped.num_windows == len(starts)
    assert int(full.sum()) > 0
    assert torch.equal(skipped.labels, full)


def test_a_body_filling_the_volume_keeps_the_whole_grid():
    body = np.full((40, 40, 20), 40.0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    starts, total = body_window_starts(body_mask(body), affine, affine, body.shape, ROI, 0.25)
    assert sorted(starts) == sorted(tuple(a for a, _ in w)
                                    for w in grid_windows(body.shape, ROI, 0.25))
    assert total == 8


def test_a_ct_of_air_has_no_body_window():
    air = np.full((40, 40, 20), -1000.0)
    starts, total = body_window_starts(body_mask(air), np.eye(4), np.eye(4), air.shape, ROI, 0.25)
    assert (starts, total) == ([], 8)


def test_predict_skips_air_on_the_model_grid_itself(tiny_ckpt: Path, tmp_path: Path):
    # A CT already on the model grid (4 mm, RAS): preprocessing may rewrite the loaded image in
    # place, so the body is found before it. A 120 mm body in a 400 mm field of view of air.
    axis = (np.arange(100) - 49.5) * 4.0
    x, y = np.meshgrid(axis, axis, indexing="ij")
    plane = np.where(x ** 2 + y ** 2 <= 60.0 ** 2, 40, -1000).astype(np.int16)
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.repeat(plane[:, :, None], 20, axis=2),
                             np.diag([4.0, 4.0, 4.0, 1.0])), ct)
    labels, windows = {}, {}
    for skip in (False, True):
        out = tmp_path / f"skip_air_{skip}"
        assert predict({"ckpt": str(tiny_ckpt), "input": str(ct), "output": str(out),
                        "masks": False, "progress": False, "sw": {"skip_air": skip}}) == 0
        labels[skip] = np.asanyarray(nib.load(out / "ct" / "labels.nii.gz").dataobj)
        windows[skip] = json.loads((out / "timing.json").read_text())["cases"][0].get("windows")
    assert windows == {False: None, True: {"computed": 4, "grid": 16}}
    # Windows start at 0, 24, 48, 68 in-plane; those at 24 and 48 touch the body. Where no
    # skipped window reaches (voxels 32..67), the same windows are blended: the same labels.
    inner = (slice(32, 68), slice(32, 68))
    assert np.array_equal(labels[True][inner], labels[False][inner])
    assert not labels[True][:24].any() and labels[False][:24].any()
