"""Clicks that hit: the vista3d_quick checkpoint on the six phantoms it never saw (its val and
test splits). One positive click at the deepest voxel of liver, spleen, each kidney and stomach,
with no class prompt, through a click session (labels equal to predict.py's); the same click with
the structure's id; the automatic mode; a negative click in a false positive."""

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

pytestmark = pytest.mark.slow
CLICKED = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")


@dataclass
class Clicked:
    """One structure of one held-out phantom: its mask, the click, and what each mode gave."""

    case: str
    name: str
    mask: np.ndarray
    click: tuple[int, int, int]
    alone: np.ndarray
    with_id: np.ndarray
    automatic: np.ndarray


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def deepest_voxel(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel of `mask` farthest from its boundary."""
    depth = ndimage.distance_transform_edt(mask)
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), mask.shape))


def held_out(phantoms: Path) -> list[str]:
    """The phantoms of the val and test splits of `phantoms/meta.csv`."""
    with (phantoms / "meta.csv").open() as f:
        return [r["image_id"] for r in csv.DictReader(f, delimiter=";") if r["split"] != "train"]


@pytest.fixture(scope="module")
def clicked(vista3d_quick_run: Path) -> list[Clicked]:
    """Every structure of `CLICKED` on every held-out phantom, clicked once."""
    phantoms = vista3d_quick_run.parent / "data" / "phantoms"
    ckpt = vista3d_quick_run / "checkpoints" / "last.ckpt"
    ids = dict(zip(CLICKED, vista3d_ids(list(CLICKED)), strict=True))
    results = []
    for case in held_out(phantoms):
        folder = phantoms / case
        with ClickSession.open(ckpt, folder / "ct.nii.gz", point_window=False) as session:
            for name in CLICKED:
                mask = np.asarray(nib.load(folder / "segmentations" / f"{name}.nii.gz").dataobj) > 0
                click = deepest_voxel(mask)
                session.reset()
                alone = session.click([click]) == 1
                session.reset()
                with_id = session.click([click], label=ids[name]) == ids[name]
                session.reset()
                prompt = parse_prompt({"labels": [ids[name]]})
                grid, _ = session.predictor.vista3d_labels(session.prepared, prompt)
                automatic = session.predictor.input_labels(session.prepared, grid, grid.dtype)
                results.append(Clicked(case, name, mask, click, alone, with_id,
                                       np.asarray(automatic) == ids[name]))
    assert len(results) == 6 * len(CLICKED)
    return results


def test_a_click_alone_hits_the_clicked_structure(clicked):
    hits = [c.alone[c.click] for c in clicked]
    assert np.mean(hits) >= 0.9, [(c.case, c.name) for c, h in zip(clicked, hits) if not h]
    assert np.mean([dice(c.alone, c.mask) for c in clicked]) >= 0.5


def test_a_click_with_the_id_scores_at_least_the_automatic_mode(clicked):
    with_id = np.mean([dice(c.with_id, c.mask) for c in clicked])
    automatic = np.mean([dice(c.automatic, c.mask) for c in clicked])
    assert with_id >= automatic - 1e-9, (with_id, automatic)


def test_a_negative_click_in_a_false_positive_removes_or_shrinks_it(vista3d_quick_run, clicked):
    phantoms = vista3d_quick_run.parent / "data" / "phantoms"
    ckpt = vista3d_quick_run / "checkpoints" / "last.ckpt"
    checked = 0
    for c in clicked:
        false = c.alone & ~c.mask
        components, count = ndimage.label(false, structure=np.ones((3, 3, 3)))
        if not count:
            continue
        sizes = ndimage.sum(false, components, range(1, count + 1))
        largest = components == 1 + int(np.argmax(sizes))
        if largest.sum() < 10:
            continue
        negative = deepest_voxel(largest)
        with ClickSession.open(ckpt, phantoms / c.case / "ct.nii.gz",
                               point_window=False) as session:
            session.click([c.click])
            after = session.click([negative], point_labels=[0]) == 1
        assert (after & largest).sum() < largest.sum(), (c.case, c.name)
        checked += 1
    assert checked >= 1
