"""The simulated user of interactive evaluation: where the next click goes, as VISTA3D's own
validation scripts place it (Project-MONAI/VISTA, `vista3d/scripts/utils/workflow_utils.py`).

- The first click (`first_click`, the paper's point protocol, `generate_prompt_pairs_val` with
  `use_center=True`): the structure eroded by a 3 x 3 x 3 box (the volume's border does not
  erode), its largest connected component (the whole structure when erosion leaves nothing), the
  voxel of it nearest its centre of mass, positive.
- Each next click (`next_click`, the iterative protocol, `get_next_points_val`): the missed part
  (truth and not predicted) and the false positive (predicted and not truth), each eroded and cut
  to its largest component; a positive click in the missed part when it is at least as large as
  the false positive, else a negative click in the false positive; the voxel drawn at random
  (the iterative script's `use_center=False`) or the one nearest the component's centre. When
  3-D erosion leaves no error, 2-D erosion (3 x 3 x 1) is tried, as the script does; when that
  leaves none either, the user stops clicking (None).

Masks are boolean arrays on the input CT's grid, clicks are voxel indices of that grid (as
`prompt.points` takes them). Distances to a centre are in mm (`spacing`), as the scripts measure
them on their 1.5 mm isotropic grid. Random draws come from the generator passed in, so the same
seed gives the same clicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctseg.inference.postprocess import largest_component

# The erosion boxes of the VISTA scripts' `erode3d`: 3-D first, then in-plane only.
EROSION_3D = (3, 3, 3)
EROSION_2D = (3, 3, 1)
# How a next click's voxel is chosen in its error component.
NEXT_CLICK = ("random", "centre")


@dataclass(frozen=True)
class Click:
    """One simulated click: its voxel (x, y, z indices of the input CT) and 1 positive, 0
    negative."""

    point: tuple[int, int, int]
    label: int

    def as_json(self) -> dict[str, object]:
        """The click as the clicks JSON holds it (`point` as `prompt.points` takes it)."""
        return {"point": list(self.point), "label": self.label}


def erode(mask: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """`mask` eroded by a box of `box` voxels; voxels beyond the volume count as inside (the
    scripts pad with ones), so a structure touching the border keeps its border voxels."""
    return ndimage.binary_erosion(mask, structure=np.ones(tuple(box), dtype=bool),
                                  border_value=1)


def nearest_centre(region: np.ndarray, spacing: Sequence[float]) -> tuple[int, int, int]:
    """The voxel of the non-empty `region` nearest (in mm) to its centre of mass; ties go to the
    first in index order."""
    voxels = np.argwhere(region)
    scale = np.asarray(spacing, dtype=float)
    offsets = (voxels - voxels.mean(axis=0)) * scale
    return tuple(int(i) for i in voxels[int(np.argmin((offsets ** 2).sum(axis=1)))])


def first_click(truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Click:
    """The paper's one positive click: nearest the centre of the largest component of the eroded
    structure (of the structure itself when erosion leaves nothing); ValueError for an empty
    `truth`."""
    if not truth.any():
        raise ValueError("first_click: the structure is empty; there is nothing to click")
    core = erode(truth, EROSION_3D)
    region = largest_component(core) if core.any() else truth
    return Click(nearest_centre(region, spacing), 1)


def error_regions(predicted: np.ndarray, truth: np.ndarray, box: Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(missed, false positive) of `predicted` against `truth`, each eroded by `box` and cut to
    its largest component (empty when erosion leaves nothing)."""
    regions = []
    for error in (truth & ~predicted, predicted & ~truth):
        eroded = erode(error, box)
        regions.append(largest_component(eroded) if eroded.any() else eroded)
    return regions[0], regions[1]


def next_click(predicted: np.ndarray, truth: np.ndarray, rng: np.random.Generator,
               spacing: Sequence[float] = (1.0, 1.0, 1.0), at: str = "random") -> Click | None:
    """The iterative protocol's next click after `predicted` (`at`: "random" voxel of the chosen
    error component, drawn from `rng`, or its "centre"); None when no error is left after
    erosion."""
    if at not in NEXT_CLICK:
        raise ValueError(f"next_click: at must be one of {', '.join(NEXT_CLICK)}, got {at!r}")
    if predicted.shape != truth.shape:
        raise ValueError(f"next_click: prediction {predicted.shape} and truth {truth.shape} "
                         "differ in shape")
    for box in (EROSION_3D, EROSION_2D):
        missed, extra = error_regions(predicted, truth, box)
        if missed.any() or extra.any():
            break
    else:
        return None
    positive = int(missed.sum()) >= int(extra.sum())
    region = missed if positive else extra
    if at == "centre":
        point = nearest_centre(region, spacing)
    else:
        voxels = np.argwhere(region)
        point = tuple(int(i) for i in voxels[int(rng.integers(len(voxels)))])
    return Click(point, int(positive))

