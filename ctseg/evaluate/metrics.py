"""Dice and normalised surface distance (NSD, "surface Dice" at a tolerance in mm) per class of a
predicted label map against the ground truth, on the ground truth's grid and physical spacing,
with TotalSegmentator's rules for empty structures: both empty -> excluded (NaN), one empty -> 0.

NSD is MONAI's `compute_surface_dice` with sub-voxel surface elements (`use_subvoxels=True`,
the definition of DeepMind's `surface_distance` that TotalSegmentator uses), computed per class
on the bounding box of prediction and ground truth (padded by one voxel), so memory stays that of
one structure, not classes x voxels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage

from ctseg.errors import DatasetError
from ctseg.labels import label_map_dtype
from ctseg.vista3d_labels import vista3d_name

log = logging.getLogger(__name__)

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


def case_rows(case: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
              names: Sequence[str], tolerance: float, classes: Sequence[int] | None = None,
              dataset: str = "") -> list[dict[str, Any]]:
    """One row (case, dataset, class, structure, Dice, NSD) per foreground class of `names`, or
    per class of `classes` (those the case's dataset annotates)."""
    wanted = range(1, len(names)) if classes is None else [c for c in classes if c]
    return [{"case": case, "dataset": dataset, "class": c, "structure": names[c], "dice": d,
             "nsd": s}
            for c, (d, s) in case_scores(pred, gt, spacing, wanted, tolerance).items()]


def names_lookup(table: Mapping[int, str], names: Sequence[str], source: str | Path
                 ) -> np.ndarray | None:
    """Label value -> class index of `names` for a label map whose values `table` names (VISTA3D
    ids and names, or another class list, matched by structure name in either spelling); None
    when the values already are `names`' indices. Structures that are no class of `names` map to
    background, with a warning naming `source`."""
    if max(table, default=0) < len(names) and all(names[v] == n for v, n in table.items()
                                                  if v >= 0):
        return None
    index = {n.lower(): c for c, n in enumerate(names)}
    index.update({vista3d_name(n).lower(): c for c, n in enumerate(names) if c})
    lookup = np.zeros(max(table, default=0) + 1, dtype=label_map_dtype(len(names)))
    unknown = []
    for value, name in table.items():
        if value and name.lower() in index:
            lookup[value] = index[name.lower()]
        elif value:
            unknown.append(name)
    if unknown:
        log.warning("%s: %d predicted structures are not TotalSegmentator classes of this "
                    "version and count as background: %s", source, len(unknown),
                    ", ".join(unknown))
    return lookup


def mapped(pred: np.ndarray, lookup: np.ndarray | None, path: str | Path) -> np.ndarray:
    """The prediction's values as class indices through `lookup` (as they are for None)."""
    if lookup is None:
        return pred
    top = int(pred.max(initial=0))
    if top >= len(lookup):
        raise DatasetError(path, f"label value {top} has no name in its label table")
    return lookup[pred]
