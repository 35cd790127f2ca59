"""Dice and normalised surface distance (NSD, "surface Dice" at a tolerance in mm) per class of a
predicted label map against the ground truth, on the ground truth's grid and physical spacing,
with TotalSegmentator's rules for empty structures: both empty -> excluded (NaN), one empty -> 0.

NSD is MONAI's `compute_surface_dice` with sub-voxel surface elements (`use_subvoxels=True`,
the definition of DeepMind's `surface_distance` that TotalSegmentator uses), computed per class
on the bounding box of prediction and ground truth (padded by one voxel), so memory stays that of
one structure, not classes x voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage

NAN = float("nan")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return NAN if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Normalised surface distance of two boolean masks at `tolerance` mm (voxel `spacing` mm);
    NaN when both are empty, 0 when one is."""
    if not pred.any() and not gt.any():
        return NAN
    if not pred.any() or not gt.any():
        return 0.0

    def onehot(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    value = compute_surface_dice(onehot(pred), onehot(gt), [float(tolerance)],
                                 include_background=False,
                                 spacing=tuple(float(s) for s in spacing), use_subvoxels=True)
    return float(value.item())


def _union_box(*boxes: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    """The smallest box holding every given box (None entries skipped)."""
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    return tuple(slice(min(b[d].start for b in present), max(b[d].stop for b in present))
                 for d in range(len(present[0])))


def case_scores(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                classes: Sequence[int], tolerance: float = 3.0
                ) -> dict[int, tuple[float, float]]:
    """(Dice, NSD) of every class index in `classes` between two integer label maps of one
    grid."""
    if pred.shape != gt.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {gt.shape}")
    top = max(classes, default=0)
    # Labels above `top` are ignored by find_objects; no full-volume copy is made.
    pred_boxes = ndimage.find_objects(pred, top)
    gt_boxes = ndimage.find_objects(gt, top)
    scores = {}
    for c in classes:
        box = _union_box(pred_boxes[c - 1], gt_boxes[c - 1])
        if box is None:
            scores[c] = (NAN, NAN)
            continue
        p = np.pad(pred[box] == c, 1)
        g = np.pad(gt[box] == c, 1)
        scores[c] = (dice(p, g), nsd(p, g, spacing, tolerance))
    return scores


def stored_labels(img: nib.Nifti1Image) -> np.ndarray:
    """The label map in its stored integer type (uint8 for TotalSegmentator: a whole-body CT at
    native resolution stays ~200 MB, not 800 MB as int32); float-stored maps rounded."""
    data = np.asanyarray(img.dataobj)
    return data if np.issubdtype(data.dtype, np.integer) else np.rint(data).astype(np.int32)
