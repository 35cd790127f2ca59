"""Windows that hold the body: the sliding windows of a CT that do not lie entirely in air.

A scanner's field of view is wider than the body (the reconstruction circle is ~500 mm, a trunk
~350 x 250 mm), so on a whole-body CT some windows of MONAI's grid see only air, where a trained
network predicts background. `sw.skip_air` computes only the windows of that grid that touch a
voxel above `AIR_HU` of the CT as loaded (before any resampling or intensity scaling, so the
threshold is in Hounsfield units whatever the model's preprocessing). The grid stays MONAI's:
every computed window sees what it sees without the option, so labels do not move. Voxels no
computed window covers get label 0 (background); the others are blended over the computed windows,
MONAI's importance map normalised by the weights actually added. (Laying the grid over the body's
bounding box instead, as TotalSegmentator and the vista3d bundle crop before their sliding window,
computes fewer windows but moves every window, and with it labels: 99.3 % equal for a briefly
trained model, benchmarks/README.md.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ctseg.sliding_window import grid_windows

# Voxels at or below this many Hounsfield units count as air: lungs (~ -850 HU) lie inside the
# body's windows anyway, fat (~ -100 HU) and the patient table's foam and carbon fibre lie above.
AIR_HU = -500.0


def body_mask(hu: np.ndarray, threshold: float = AIR_HU) -> np.ndarray:
    """The voxels of `hu` (a CT as loaded, in Hounsfield units) above `threshold`."""
    return np.asarray(hu) > threshold


def body_window_starts(body: np.ndarray, ct_affine: np.ndarray, grid_affine: np.ndarray,
                       grid_shape: Sequence[int], roi: Sequence[int], overlap: float
                       ) -> tuple[list[tuple[int, ...]], int]:
    """Starts (in voxels of the model grid as the sliding window pads it) of the windows of
    MONAI's grid that touch a voxel of `body` (`body_mask` of the CT as loaded, voxel-to-world
    `ct_affine`), and the number of windows of the grid. `grid_affine` maps the model grid's
    voxels (`grid_shape`) to the same world coordinates."""
    padded = [max(int(s), int(r)) for s, r in zip(grid_shape, roi, strict=True)]
    pad_before = [(p - int(s)) // 2 for p, s in zip(padded, grid_shape, strict=True)]
    windows = grid_windows(padded, roi, overlap)
    if not body.any():
        return [], len(windows)
    to_ct = np.linalg.inv(np.asarray(ct_affine, dtype=np.float64)) @ np.asarray(
        grid_affine, dtype=np.float64)
    limits = np.asarray(body.shape)
    starts = []
    for window in windows:
        # The window's voxels in the CT's voxels: the box its corners span, one voxel wider.
        corners = np.array([[*corner, 1.0] for corner in itertools.product(
            *((a - p, b - 1 - p) for (a, b), p in zip(window, pad_before, strict=True)))])
        points = (to_ct @ corners.T)[:3]
        low = np.clip(np.floor(points.min(axis=1)).astype(int) - 1, 0, limits)
        high = np.clip(np.ceil(points.max(axis=1)).astype(int) + 2, 0, limits)
        if body[tuple(slice(a, b) for a, b in zip(low, high, strict=True))].any():
            starts.append(tuple(a for a, _ in window))
    return starts, len(windows)
