"""Post-processing chosen on out-of-fold predictions (nnU-Net's rule): the largest component is
kept where it helps or does no harm, not where it removes true structure; the component kept is
scipy's largest 26-connected one."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctseg.evaluate.postprocess import choose
from ctseg.inference.postprocess import keep_largest

NAMES = ["background", "liver", "kidney"]


def volume() -> np.ndarray:
    """An empty 20^3 label map."""
    return np.zeros((20, 20, 20), dtype=np.uint8)


def test_keep_largest_keeps_scipys_largest_26_connected_component() -> None:
    labels = volume()
    labels[2:8, 2:8, 2:8] = 1
    labels[8, 8, 8] = 1  # touches the cube by a corner: 26-connected to it
    labels[14:16, 14:16, 14:16] = 1  # a separate blob
    labels[10:12, 2:4, 2:4] = 2
    components, _ = ndimage.label(labels == 1, structure=np.ones((3, 3, 3)))
    largest = np.bincount(components.ravel())[1:].argmax() + 1
    before = labels.copy()
    kept = keep_largest(labels, [1])
    assert np.array_equal(labels, before)  # the input is left as it was
    assert np.array_equal(kept == 1, components == largest)
    assert kept[8, 8, 8] == 1 and kept[14, 14, 14] == 0
    assert np.array_equal(kept == 2, labels == 2)  # other classes untouched
    assert kept.dtype == labels.dtype


def test_the_largest_component_is_chosen_where_it_helps_and_not_where_it_hurts() -> None:
    cases = []
    for shift in (0, 1):
        gt, pred = volume(), volume()
        gt[2:8, 2:8, 2:8] = 1
        pred[2 + shift:8, 2:8, 2:8] = 1
        pred[15:17, 15:17, 15:17] = 1  # a false blob: dropping it helps the liver
        gt[2:5, 12:15, 12:15] = 2
        gt[12:15, 2:5, 2:5] = 2  # the kidneys are two components: dropping one hurts
        pred[gt == 2] = 2
        cases.append((pred, gt))
    chosen, tested = choose(cases, NAMES)
    assert chosen == ["liver"]
    assert tested["liver"]["dice_largest_component"] > tested["liver"]["dice"]
    assert tested["kidney"]["dice_largest_component"] < tested["kidney"]["dice"] == 1.0
