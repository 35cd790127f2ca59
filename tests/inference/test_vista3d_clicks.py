"""Clicks that hit, held out: the vista3d_quick checkpoint on the three phantoms of its test
split. One positive click at the deepest voxel of liver, spleen, each kidney and stomach, with
no class prompt, through a click session (labels equal to predict.py's; a window centred on each
click, predict's default); a negative click at the deepest voxel of the largest false positive
that click gave; the first click with the structure's id; the automatic mode (the five ids in
one prompt).

vista3d_quick trains the automatic branch only, so these wait, as strict xfails, for a recipe
whose point stage learns: the day one does, they pass and the suite fails until the marks go."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ctseg.inference.click_session import ClickSession
from ctseg.inference.prompts import parse_prompt
from ctseg.vista3d_labels import vista3d_ids

CLICKED = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")
POINT_STAGE = ("VISTA3D's point stage does not learn within the CPU budget of "
               "experiment=vista3d_quick: the recipe trains the automatic branch only "
               "(drop_point_prob=1.0), and a point stage on its frozen encoder (model.stages) "
               "went from loss 0.92 to 0.89 in 20-30 epochs with no click hit on held-out "
               "phantoms (docs/vista3d.md). Measured on the vista3d_quick checkpoint: a click "
               "alone hits 5 of 15 structures, mean Dice 0.006 (its output covers most of the "
               "window or nothing); with the id, Dice 0.02 against 0.77 for the automatic mode; "
               "a negative click removes 2-8 % of a false positive, or everything with the "
               "clicked voxel")
# Only a failed assertion is the expected failure: any other error (a changed API, a missing
# file) fails the test.
pytestmark = [pytest.mark.slow,
              pytest.mark.xfail(strict=True, raises=AssertionError, reason=POINT_STAGE)]


@dataclass
class Clicked:
    """One structure of one held-out phantom: its mask, the click, what each mode gave, and the
    largest false positive of the click alone with what a negative click in it left (None when
    the click alone gave no false positive of 10 voxels)."""

    case: str
    name: str
    mask: np.ndarray
    click: tuple[int, int, int]
    alone: np.ndarray
    with_id: np.ndarray
    automatic: np.ndarray
    false_positive: np.ndarray | None
    after_negative: np.ndarray | None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def deepest_voxel(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel of `mask` farthest from its boundary."""
    depth = ndimage.distance_transform_edt(mask)
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), mask.shape))


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 26-connected component of `mask`, None when it has under 10 voxels."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if not count:
        return None
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    largest = components == 1 + int(np.argmax(sizes))
    return largest if largest.sum() >= 10 else None


def split(phantoms: Path, name: str) -> list[str]:
    """The phantoms of split `name` of `phantoms/meta.csv`."""
    with (phantoms / "meta.csv").open() as f:
        return [r["image_id"] for r in csv.DictReader(f, delimiter=";") if r["split"] == name]


@pytest.fixture(scope="module")
def clicked(vista3d_quick_run: Path) -> list[Clicked]:
    """Every structure of `CLICKED` on every test phantom, clicked once (a session per phantom:
    its image loaded and preprocessed once)."""
    phantoms = vista3d_quick_run.parent / "data" / "phantoms"
    ckpt = vista3d_quick_run / "checkpoints" / "last.ckpt"
    ids = dict(zip(CLICKED, vista3d_ids(["background", *CLICKED])[1:], strict=True))
    results = []
    for case in split(phantoms, "test"):
        folder = phantoms / case
        with ClickSession.open(ckpt, folder / "ct.nii.gz") as session:
            prompt = parse_prompt({"labels": list(ids.values())})
            grid, _ = session.predictor.vista3d_labels(session.prepared, prompt)
            automatic = session.predictor.input_labels(session.prepared, grid, grid.dtype)
            for name, label in ids.items():
                mask = np.asarray(nib.load(folder / "segmentations" / f"{name}.nii.gz").dataobj) > 0
                click = deepest_voxel(mask)
                session.reset()
                alone = session.click([click]) == 1
                false_positive = largest_component(alone & ~mask)
                after = None if false_positive is None else session.click(
                    [deepest_voxel(false_positive)], point_labels=[0]) == 1
                session.reset()
                with_id = session.click([click], label=label) == label
                results.append(Clicked(case, name, mask, click, alone, with_id,
                                       automatic == label, false_positive, after))
    if len(results) != 3 * len(CLICKED):  # not an AssertionError: the xfail would take it
        raise ValueError(f"{phantoms}: {len(results)} structures clicked, expected 15")
    return results


def test_a_click_alone_hits_the_clicked_structure(clicked):
    hits = [c.alone[c.click] for c in clicked]
    assert np.mean(hits) >= 0.9, [(c.case, c.name) for c, h in zip(clicked, hits, strict=True)
                                  if not h]
    assert np.mean([dice(c.alone, c.mask) for c in clicked]) >= 0.5


def test_a_click_with_the_id_scores_at_least_the_automatic_mode(clicked):
    with_id = np.mean([dice(c.with_id, c.mask) for c in clicked])
    automatic = np.mean([dice(c.automatic, c.mask) for c in clicked])
    assert with_id >= automatic - 1e-9, (with_id, automatic)


def test_a_negative_click_in_a_false_positive_removes_most_of_it(clicked):
    """After a click alone that hit, a negative click at the deepest voxel of its largest false
    positive removes at least half of it and keeps the clicked voxel (any click moves the
    untrained head's output by a few per cent, so "fewer voxels" alone would pass by noise)."""
    hits = [c for c in clicked if c.alone[c.click]]
    assert hits, "no click alone hit its structure: nothing to correct"
    for c in hits:
        if c.false_positive is not None:
            left = int((c.after_negative & c.false_positive).sum())
            assert c.after_negative[c.click], (c.case, c.name, "the clicked voxel was lost")
            assert left <= c.false_positive.sum() / 2, (c.case, c.name, left,
                                                         int(c.false_positive.sum()))
