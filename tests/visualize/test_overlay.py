"""Overlay figures: slice choice, radiological orientation from any stored orientation, spacing,
window, legend; `python -m ctseg.visualize` on the shared crop and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest

from ctseg.colours import label_colours
from ctseg.errors import ConfigError, DatasetError, MissingFileError
from ctseg.inference.outputs import label_json
from ctseg.labels import label_names
from ctseg.visualize.__main__ import visualize
from ctseg.visualize.overlay import (
    _display,
    canonical_labels,
    canonical_slab,
    centre_slices,
    render_overlay,
    slice_indices,
    window_bounds,
)

REPO = Path(__file__).resolve().parents[2]


def _matches(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Number of pixels of an RGB(A) float image equal to an 8-bit colour."""
    return int((np.abs(image[..., :3] - np.array(colour) / 255).max(axis=-1) < 1.5 / 255).sum())


def test_slices_go_through_the_centre_of_the_labels():
    labels = np.zeros((40, 30, 20), dtype=np.uint8)
    labels[10:15, 20:25, 2:7] = 3
    assert centre_slices(labels) == (12, 22, 4)
    # Two blobs: the centre of mass (x = 19.5) holds no label; the nearest plane that does.
    labels[30:35, 20:25, 2:7] = 4
    assert centre_slices(labels)[0] == 14
    assert centre_slices(np.zeros((40, 30, 20))) is None
    assert slice_indices(np.zeros((40, 30, 20))) == (20, 15, 10)


def test_planes_are_shown_radiologically_from_any_stored_orientation(tmp_path):
    ras = np.zeros((6, 5, 4), dtype=np.int16)
    ras[5, 4, 3] = 7  # the patient's right, anterior, superior corner
    # Stored as L, S, P: axes permuted and flipped; the voxels and world positions are the same.
    stored = np.flip(np.transpose(ras, (0, 2, 1)), axis=(0, 2)).copy()
    flip = np.array([[-2.0, 0, 0, 10], [0, 0, -2.5, 10], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(stored, flip)
    assert nib.aff2axcodes(img.affine) == ("L", "S", "P")
    canonical = nib.as_closest_canonical(img)
    assert np.array_equal(np.asanyarray(canonical.dataobj), ras)
    labels, spacing = canonical_labels(img, tmp_path / "x.nii.gz")
    assert np.array_equal(labels, ras) and spacing == (2.0, 2.5, 3.0)
    assert canonical.header.get_zooms() == spacing
    for axis, index in ((2, 3), (1, 4), (0, 5)):
        plane = canonical_slab(img, axis, index)
        assert np.array_equal(plane, np.take(ras, index, axis=axis))
        # Right / anterior / superior are the screen's left and top: the marker is top-left.
        assert _display(plane)[0, 0] == 7


def test_spacing_sets_the_aspect_and_the_legend_is_capped():
    labels = np.zeros((40, 40, 10), dtype=np.uint8)
    for value in range(1, 31):
        labels[value - 1, :value, :] = value  # value v: v pixels in every axial plane
    # Coronal and sagittal planes cut outside the labels: only the axial plane counts.
    figure = render_overlay(np.zeros(labels.shape, np.float32), {"truth": labels}, (1, 1, 3),
                            label_names("v1"), slices=(39, 39, 5), max_legend=5)
    axial, coronal, sagittal, legend = figure.axes
    assert (axial.get_aspect(), coronal.get_aspect(), sagittal.get_aspect()) == (1, 3, 3)
    texts = [t.get_text() for t in legend.get_legend().get_texts()]
    # The structures with most pixels in the shown planes first.
    assert texts == [label_names("v1")[v] for v in (30, 29, 28, 27, 26)] + ["+25 more"]
    plt.close(figure)
    empty = render_overlay(np.zeros((8, 8, 8), np.float32), {"truth": np.zeros((8, 8, 8), int)},
                           (1, 1, 1), ["background"])
    assert "no labelled structure" in empty.axes[-1].texts[0].get_text()


def test_windows():
    assert window_bounds("abdomen") == (-160, 240)
    assert window_bounds([1500, -600]) == (-1350, 150)
    assert window_bounds(None) is None and window_bounds("auto") is None
    with pytest.raises(ConfigError, match="window=soft: unknown preset; choose one of abdomen"):
        window_bounds("soft")
    with pytest.raises(ConfigError, match=r"width > 0"):
        window_bounds([0, 40])


def test_cli_draws_the_structures_in_their_table_colours(shared_data, tmp_path):
    case = shared_data / "s0001"
    out = tmp_path / "nested" / "overlay.png"
    result = subprocess.run([sys.executable, "-m", "ctseg.visualize", f"ct={case / 'ct.nii.gz'}",
                             f"labels={case / 'label_totalseg_v2.nii.gz'}", f"out={out}",
                             "version=v2", "alpha=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"written: {out}" in result.stdout
    assert [p.name for p in out.parent.iterdir()] == ["overlay.png"]  # no temporary left over
    image = plt.imread(out)
    assert image[..., :3].std() > 0.1  # drawn, not blank
    colours = label_colours(label_names("v2"))
    names = label_names("v2")
    # alpha=1: liver (the largest structure) in its exact table colour over many pixels, and the
    # aorta's colour too (the legend patch alone is ~150 pixels).
    assert _matches(image, colours[names.index("liver")]) > 2000
    assert _matches(image, colours[names.index("aorta")]) > 200
    # Blended (default alpha): the legend patch still shows the exact colour.
    summary = visualize({"ct": case / "ct.nii.gz", "labels": case / "label_totalseg_v2.nii.gz",
                         "out": tmp_path / "blended.png", "version": "v2"})
    assert summary["shown"] >= 20
    blended = plt.imread(tmp_path / "blended.png")
    assert 20 < _matches(blended, colours[names.index("liver")]) < 1000


def test_names_come_from_predicts_labels_json(shared_data, tmp_path):
    case = shared_data / "s0001"
    folder = tmp_path / "pred"
    folder.mkdir()
    (folder / "labels.nii.gz").symlink_to(case / "label_totalseg_v2.nii.gz")
    cfg = {"ct": case / "ct.nii.gz", "labels": folder / "labels.nii.gz",
           "out": tmp_path / "o.png"}
    with pytest.raises(DatasetError, match=r"label value 117 has no name .* needs version=v2"):
        visualize(cfg)  # v1 names by default
    (folder / "labels.json").write_text(label_json(label_names("v2")))
    assert visualize(cfg)["names"] == str(folder / "labels.json")
    (folder / "labels.json").write_text(json.dumps(["not", "a", "table"]))
    with pytest.raises(DatasetError, match=r"labels\.json: not a label table"):
        visualize(cfg)
    with pytest.raises(ConfigError, match="version=v3: choose one of v1, v2"):
        visualize({**cfg, "version": "v3"})
    with pytest.raises(ConfigError, match=r"out=.*o.jpg: the overlay is a PNG"):
        visualize({**cfg, "out": tmp_path / "o.jpg", "version": "v2"})
    with pytest.raises(ConfigError, match=r"missing labels, out: python -m ctseg\.visualize ct="):
        visualize({"ct": case / "ct.nii.gz"})
    with pytest.raises(MissingFileError, match=r"nope.nii.gz: no such file \(the CT\)"):
        visualize({**cfg, "ct": tmp_path / "nope.nii.gz", "version": "v2"})


def test_cli_names_both_files_of_different_grids(shared_data, tmp_path):
    ct = shared_data / "s0001" / "ct.nii.gz"
    img = nib.load(shared_data / "s0001" / "label_totalseg_v2.nii.gz")
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 1:], img.affine, img.header),
             cropped)
    out = tmp_path / "overlay.png"
    result = subprocess.run([sys.executable, "-m", "ctseg.visualize", f"ct={ct}",
                             f"labels={cropped}", f"out={out}", "version=v2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"error: {cropped}: grid (122, 101, 29)" in result.stderr
    assert f"differs from the CT {ct} of grid (122, 101, 30) of [3.0, 3.0, 3.0] mm" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_help_names_the_keys():
    result = subprocess.run([sys.executable, "-m", "ctseg.visualize", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "== python -m ctseg.visualize ==" in result.stdout
    assert "ct, labels, out (required)" in result.stdout
