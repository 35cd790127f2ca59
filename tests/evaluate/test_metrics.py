"""Dice and NSD on built volumes with answers worked out by hand, and the empty-structure rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctseg.evaluate.metrics import case_scores, dice, nsd


def cube(shape=(40, 40, 40), start=(10, 10, 10), size=20) -> np.ndarray:
    """A boolean cube of `size` voxels per side at `start`."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def sphere(shape, centre, radius_mm, spacing) -> np.ndarray:
    """A boolean ball of `radius_mm` on a grid of `spacing` mm."""
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)),
                       indexing="ij")
    centre_mm = [c * s for c, s in zip(centre, spacing, strict=True)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm, strict=True)) <= radius_mm ** 2


def test_dice_of_a_cube_shifted_by_two_voxels():
    # 20^3 cubes overlapping in 18 x 20 x 20 voxels: 2 * 7200 / (8000 + 8000).
    assert dice(cube(start=(12, 10, 10)), cube()) == pytest.approx(0.9)


def test_nsd_of_a_shift_reaches_one_exactly_at_the_shift_distance():
    # Every surface point of either cube lies within 2 voxels of the other surface, and the two
    # faces across the shift are exactly 2 apart: NSD is 1 from a 2 mm tolerance on, < 1 below.
    shifted, reference = cube(start=(12, 10, 10)), cube()
    assert nsd(shifted, reference, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)
    assert nsd(shifted, reference, (1.0, 1.0, 1.0), 1.99) < 0.75
    # With 0.5 mm voxels along the shift the faces are 1 mm apart.
    assert nsd(shifted, reference, (0.5, 1.0, 1.0), 1.0) == pytest.approx(1.0)
    assert nsd(shifted, reference, (0.5, 1.0, 1.0), 0.99) < 0.75


def test_anisotropic_sphere_shifted_along_its_coarse_axis():
    spacing = (1.0, 1.0, 3.0)
    reference = sphere((40, 40, 16), (20, 20, 8), 12.0, spacing)
    shifted = np.roll(reference, 1, axis=2)  # one 3 mm voxel
    assert nsd(reference, reference, spacing, 0.1) == pytest.approx(1.0)
    assert dice(reference, reference) == 1.0
    assert nsd(shifted, reference, spacing, 3.0) == pytest.approx(1.0)
    assert nsd(shifted, reference, spacing, 2.9) < 1.0
    # The same shift along a 1 mm axis is within 1 mm.
    across = np.roll(reference, 1, axis=0)
    assert nsd(across, reference, spacing, 1.0) == pytest.approx(1.0)


def test_empty_structures_follow_totalsegmentator():
    empty, full = np.zeros((8, 8, 8), bool), cube((8, 8, 8), (2, 2, 2), 4)
    assert math.isnan(dice(empty, empty)) and math.isnan(nsd(empty, empty, (1, 1, 1), 3))
    assert dice(full, empty) == 0.0 and nsd(full, empty, (1, 1, 1), 3) == 0.0
    assert dice(empty, full) == 0.0 and nsd(empty, full, (1, 1, 1), 3) == 0.0


def test_case_scores_per_class_on_label_maps():
    gt = np.zeros((40, 40, 40), np.uint8)
    gt[cube()] = 1
    gt[:5, :5, :5] = 3
    pred = np.zeros_like(gt)
    pred[cube(start=(12, 10, 10))] = 1
    pred[35:, 35:, 35:] = 2  # a false positive; class 3 missed
    scores = case_scores(pred, gt, (1.0, 1.0, 1.0), [1, 2, 3, 4], tolerance=2.0)
    assert scores[1] == pytest.approx((0.9, 1.0))
    assert scores[2] == (0.0, 0.0) and scores[3] == (0.0, 0.0)
    assert all(math.isnan(v) for v in scores[4])
