"""Label colours as predict.py's Slicer / ITK-SNAP tables and the overlays show them: every two
structures of a class table clearly apart (CIE76 distance in scikit-image's CIELAB), and one colour
per structure name in TotalSegmentator v1, v2 and VISTA3D's spelling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import SHARED_DATA
from skimage.color import rgb2lab

from ctseg.inference.outputs import itksnap_table, slicer_table
from ctseg.visualize.overlay import render_overlay

REFERENCE = SHARED_DATA.parent / "reference"
# CIE76 distance every two structures of a table keep (2.3 is a just-noticeable difference).
MIN_DELTA_E = 12.0


def reference_names(table: str) -> dict[int, str]:
    """Value -> structure name of a class table in the shared reference copies (background 0)."""
    data = json.loads((REFERENCE / f"{table}.json").read_text())
    names = data.get("label_dict", data)
    return {0: "background", **{int(k): v for k, v in names.items()}}


def table_colours(names: dict[int, str]) -> dict[str, tuple[int, int, int]]:
    """Structure name -> RGB as the Slicer colour table written for `names` gives it (the ITK-SNAP
    table checked to agree), background left out."""
    slicer = {int(row[0]): tuple(map(int, row[2:5])) for row in
              (line.split() for line in slicer_table(names).splitlines() if line[0] != "#")}
    snap = {int(row[0]): tuple(map(int, row[1:4])) for row in
            (line.split() for line in itksnap_table(names).splitlines() if line[0] != "#")}
    assert snap == slicer
    return {names[value]: rgb for value, rgb in slicer.items() if value}


@pytest.mark.parametrize("table", ["totalseg_v1_classes", "totalseg_v2_classes",
                                   "vista3d_labels"])
def test_every_two_structures_of_a_table_are_clearly_apart(table: str) -> None:
    colours = table_colours(reference_names(table))
    names = list(colours)
    lab = rgb2lab(np.array([colours[n] for n in names], dtype=float)[None] / 255)[0]
    distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    a, b = np.unravel_index(distance.argmin(), distance.shape)
    assert distance[a, b] > MIN_DELTA_E, (f"{names[a]} {colours[names[a]]} and {names[b]} "
                                          f"{colours[names[b]]}: delta E {distance[a, b]:.1f}")


def test_a_structure_has_one_colour_in_v1_v2_vista3d_and_the_overlays() -> None:
    v1 = table_colours(reference_names("totalseg_v1_classes"))
    v2 = table_colours(reference_names("totalseg_v2_classes"))
    both = sorted(set(v1) & set(v2))
    assert len(both) > 90 and {n: v1[n] for n in both} == {n: v2[n] for n in both}
    vista = table_colours(reference_names("vista3d_labels"))
    for totalseg, spelled in (("liver", "liver"), ("kidney_right", "right kidney"),
                              ("rib_left_1", "left rib 1"), ("urinary_bladder", "bladder"),
                              ("vertebrae_L1", "vertebrae L1")):
        assert vista[spelled] == v2[totalseg], totalseg
    # the overlay's legend patches carry the table colours
    names = reference_names("totalseg_v1_classes")
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    for i, value in enumerate((2, 36, 70, 104)):  # the old palette's repeat: one colour nearly
        labels[2 + 2 * i:4 + 2 * i, 3:9, 3:9] = value
    figure = render_overlay(np.zeros(labels.shape), {"labels": labels}, (1.0, 1.0, 1.0), names,
                            slices=(5, 5, 5))
    legend = figure.axes[-1].get_legend()
    shown = {text.get_text(): tuple(round(c * 255) for c in patch.get_facecolor()[:3])
             for text, patch in zip(legend.get_texts(), legend.get_patches(), strict=True)}
    assert shown == {names[v]: v1[names[v]] for v in (2, 36, 70, 104)}
