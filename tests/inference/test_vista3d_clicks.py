"""Clicks that hit, held out: the vista3d_quick checkpoint on the three phantoms of its test
split, clicked as interactive evaluation clicks (`ctseg.evaluate.clicks`): one positive click
nearest the centre of the eroded liver, spleen, each kidney and stomach, with no class prompt,
through a click session (labels equal to predict.py's; a window centred on each click, predict's
default); the protocol's next click after it, when that is a negative click in a false positive;
the first click with the structure's id; the automatic mode (the five ids in one prompt). Dice is
ctseg.evaluate.metrics'.

vista3d_quick trains the automatic branch only, so these wait, as strict xfails, for a recipe
whose point stage learns: the day one does, they pass and the suite fails until the marks go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ctseg.evaluate.clicks import Click, first_click, next_click
from ctseg.evaluate.interactive import case_folders, structure_ids, structure_rng
from ctseg.evaluate.metrics import dice
from ctseg.inference.click_session import ClickSession
from ctseg.inference.prompts import parse_prompt

CLICKED = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")
POINT_STAGE = ("VISTA3D's point stage does not learn within the CPU budget of "
               "experiment=vista3d_quick: the recipe trains the automatic branch only "
               "(drop_point_prob=1.0), and a point stage on its frozen encoder (model.stages) "
               "went from loss 0.92 to 0.89 in 20-30 epochs with no click hit on held-out "
               "phantoms (docs/vista3d.md). Measured on the vista3d_quick checkpoint with the "
               "interactive-evaluation protocol: a click alone (nearest the eroded structure's "
               "centre) hits 8 of 15 structures, mean Dice 0.010 (its output covers half the "
               "volume or more, or nothing); with the id, Dice 0.023 against 0.69 for the "
               "automatic mode; the protocol's negative click removes 3-9 % of the false "
               "positive it lies in, or everything with the clicked voxel")
# The seed of the protocol's random next click (any seed; fixed, so reruns click the same voxels).
SEED = 0
# Only a failed assertion is the expected failure: any other error (a changed API, a missing
# file) fails the test.
pytestmark = [pytest.mark.slow,
              pytest.mark.xfail(strict=True, raises=AssertionError, reason=POINT_STAGE)]


@dataclass
class Clicked:
    """One structure of one held-out phantom: its mask, the first click, what each mode gave;
    the protocol's next click after the click alone when it is negative, the false positive it
    lies in (its 26-connected component) and what the click left (None otherwise)."""

    case: str
    name: str
    mask: np.ndarray
    click: Click
    alone: np.ndarray
    with_id: np.ndarray
    automatic: np.ndarray
    negative: Click | None
    false_positive: np.ndarray | None
    after_negative: np.ndarray | None


def component_at(mask: np.ndarray, point: tuple[int, int, int]) -> np.ndarray:
    """The 26-connected component of `mask` holding voxel `point`."""
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return components == components[point]


@pytest.fixture(scope="module")
def clicked(vista3d_quick_run: Path) -> list[Clicked]:
    """Every structure of `CLICKED` on every test phantom, clicked once (a session per phantom:
    its image loaded and preprocessed once), then corrected once where the protocol's next click
    is negative."""
    phantoms = vista3d_quick_run.parent / "data" / "phantoms"
    ckpt = vista3d_quick_run / "checkpoints" / "last.ckpt"
    ids = structure_ids(CLICKED)
    results = []
    for case, folder in case_folders(phantoms, "test"):
        spacing = nib.load(folder / "ct.nii.gz").header.get_zooms()[:3]
        with ClickSession.open(ckpt, folder / "ct.nii.gz") as session:
            prompt = parse_prompt({"labels": list(ids.values())})
            grid, _ = session.predictor.vista3d_labels(session.prepared, prompt)
            automatic = session.predictor.input_labels(session.prepared, grid, grid.dtype)
            for name, label in ids.items():
                mask = np.asarray(nib.load(folder / "segmentations" / f"{name}.nii.gz").dataobj) > 0
                click = first_click(mask, spacing)
                session.reset()
                alone = session.click([click.point]) == 1
                negative = next_click(alone, mask, structure_rng(SEED, case, name), spacing)
                false_positive = after = None
                if negative is not None and negative.label == 0:
                    false_positive = component_at(alone & ~mask, negative.point)
                    after = session.click([negative.point], point_labels=[0]) == 1
                else:
                    negative = None
                session.reset()
                with_id = session.click([click.point], label=label) == label
                results.append(Clicked(case, name, mask, click, alone, with_id,
                                       automatic == label, negative, false_positive, after))
    if len(results) != 3 * len(CLICKED):  # not an AssertionError: the xfail would take it
        raise ValueError(f"{phantoms}: {len(results)} structures clicked, expected 15")
    return results


def test_a_click_alone_hits_the_clicked_structure(clicked):
    hits = [c.alone[c.click.point] for c in clicked]
    assert np.mean(hits) >= 0.9, [(c.case, c.name) for c, h in zip(clicked, hits, strict=True)
                                  if not h]
    assert np.mean([dice(c.alone, c.mask) for c in clicked]) >= 0.5


def test_a_click_with_the_id_scores_at_least_the_automatic_mode(clicked):
    with_id = np.mean([dice(c.with_id, c.mask) for c in clicked])
    automatic = np.mean([dice(c.automatic, c.mask) for c in clicked])
    assert with_id >= automatic - 1e-9, (with_id, automatic)


def test_a_negative_click_in_a_false_positive_removes_most_of_it(clicked):
    """After a click alone that hit, the protocol's negative click (in the largest eroded false
    positive) removes at least half of the false positive it lies in and keeps the first click's
    voxel (any click moves the untrained head's output by a few per cent, so "fewer voxels"
    alone would pass by noise)."""
    hits = [c for c in clicked if c.alone[c.click.point]]
    assert hits, "no click alone hit its structure: nothing to correct"
    for c in hits:
        if c.negative is not None:
            left = int((c.after_negative & c.false_positive).sum())
            assert c.after_negative[c.click.point], (c.case, c.name, "the clicked voxel was lost")
            assert left <= c.false_positive.sum() / 2, (c.case, c.name, left,
                                                         int(c.false_positive.sum()))
