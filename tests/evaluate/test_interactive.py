"""`python -m ctseg.evaluate.interactive` as typed from a user's folder, on the real crop in its
download layout with a small random VISTA3D: its outputs, the first click of each structure where
the protocol puts it, each Dice equal to the labels predict.py gives for the same clicks, a rerun
that keeps the finished case, another prompt mode scored on the same clicks (`clicks_from`), and
`ctseg.compare` putting the two curves side by side."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, save_checkpoint
from matplotlib import image

from ctseg.evaluate.clicks import first_click
from ctseg.evaluate.metrics import dice
from ctseg.inference.inputs import Case
from ctseg.inference.pipeline import CasePredictor, PredictOptions
from ctseg.inference.prompts import parse_prompt
from ctseg.labels import label_names
from ctseg.models.loading import load_model
from ctseg.models.vista3d import VISTA3DModule

pytestmark = pytest.mark.slow
CROP = SHARED_DATA / "totalseg_mini"
STRUCTURES = ("liver", "spleen")
EMPTY = "brain"  # asked too, but empty in the crop's ground truth: recorded, never clicked
ASKED = f"structures=[{','.join((*STRUCTURES, EMPTY))}]"
CLICKS = 3
USER_ENV = {k: v for k, v in os.environ.items() if not k.startswith("CTSEG_")}


def command(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m ctseg.<args>` run from `cwd` with a user's environment; asserts it succeeded."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=USER_ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder holding a random small VISTA3D checkpoint (6 mm, 32 x 32 x 24 windows)
    and the outputs of `python -m ctseg.evaluate.interactive` run there as typed."""
    folder = tmp_path_factory.mktemp("interactive")
    torch.manual_seed(0)
    module = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                           roi_size=(32, 32, 24)).eval()
    save_checkpoint(module, folder / "vista3d.ckpt", {
        "version": "v1", "spacing": 6.0, "intensity": "hu_window", "smooth_sigma": 0.0,
        "patch_size": [32, 32, 24]})
    result = command(folder, "ctseg.evaluate.interactive", "ckpt=vista3d.ckpt", f"gt={CROP}",
                     "split=test", ASKED, f"clicks={CLICKS}")
    (folder / "first_run.log").write_text(result.stdout + result.stderr)
    return folder


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_hold_every_click_of_every_structure(user):
    out = user / "interactive_evaluation"
    rows = csv_rows(out / "clicks.csv")
    assert [(r["structure"], int(r["click"])) for r in rows] == [
        (s, k) for s in STRUCTURES for k in range(1, CLICKS + 1)]
    assert {r["case"] for r in rows} == {"s0001"}
    record = json.loads((out / "clicks" / "s0001.json").read_text())
    assert record["empty"] == [EMPTY] and EMPTY not in record["structures"]
    shape = nib.load(CROP / "s0001" / "ct.nii.gz").shape
    for name in STRUCTURES:
        entry = record["structures"][name]
        assert 1 <= len(entry["clicks"]) <= CLICKS and len(entry["dice"]) == CLICKS
        for click in entry["clicks"]:
            assert click["label"] in (0, 1)
            assert all(0 <= p < n for p, n in zip(click["point"], shape, strict=True))
        assert entry["clicks"][0]["label"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["dice_after"]) == ["1", "3"]  # 5 and 10 lie beyond the budget of 3
    assert len(summary["curve"]["overall"]) == CLICKS and summary["cases"] == 1
    assert summary["structures"] == len(STRUCTURES) and summary["seconds"]["first"] > 0
    assert image.imread(out / "dice_vs_clicks.png").shape[2] in (3, 4)
    printed = (user / "first_run.log").read_text()
    assert "| structure | cases | Dice after 1 | Dice after 3 | AUC |" in printed
    assert printed.count("trained without clicks") == 1  # once, not once per case or structure


def test_first_click_is_the_protocols_and_each_dice_is_predict_pys(user):
    """Each structure's first click is the protocol's on the mask file; the Dice after its last
    click equals that of predict.py's labels for the same clicks (a fresh CasePredictor run)."""
    record = json.loads((user / "interactive_evaluation" / "clicks" / "s0001.json").read_text())
    ct = CROP / "s0001" / "ct.nii.gz"
    spacing = nib.load(ct).header.get_zooms()[:3]
    model = load_model(user / "vista3d.ckpt", {}, {})
    for name in STRUCTURES:
        truth = np.asarray(nib.load(CROP / "s0001" / "segmentations" / f"{name}.nii.gz")
                           .dataobj) > 0
        entry = record["structures"][name]
        assert tuple(entry["clicks"][0]["point"]) == first_click(truth, spacing).point
        prompt = parse_prompt({"points": [c["point"] for c in entry["clicks"]],
                               "point_labels": [c["label"] for c in entry["clicks"]]})
        with CasePredictor(model, PredictOptions(prompt=prompt)) as predictor:
            labels = predictor.segment(Case("s0001", ct, "nifti")).labels
        assert dice(labels == 1, truth) == pytest.approx(entry["dice"][len(entry["clicks"]) - 1],
                                                          abs=1e-9)


def test_a_rerun_keeps_the_case_and_another_mode_replays_the_clicks(user):
    out = user / "interactive_evaluation"
    before = (out / "clicks" / "s0001.json").read_text()
    rerun = command(user, "ctseg.evaluate.interactive", "ckpt=vista3d.ckpt", f"gt={CROP}",
                    "split=test", ASKED, f"clicks={CLICKS}")
    assert "s0001: clicked by an earlier run with these settings, kept" in rerun.stdout
    assert f"{EMPTY} is empty in the ground truth" not in rerun.stdout + rerun.stderr
    assert (out / "clicks" / "s0001.json").read_text() == before
    command(user, "ctseg.evaluate.interactive", "ckpt=vista3d.ckpt", f"gt={CROP}", "split=test",
            ASKED, f"clicks={CLICKS}", "with_id=true",
            "clicks_from=interactive_evaluation", "output=with_id")
    first = json.loads(before)["structures"]
    replayed = json.loads((user / "with_id" / "clicks" / "s0001.json").read_text())["structures"]
    for name in STRUCTURES:
        assert replayed[name]["clicks"] == first[name]["clicks"]
    compared = command(user, "ctseg.compare", "interactive_evaluation", "with_id", "--out",
                       "compared")
    table = (user / "compared" / "clicks_compare.md").read_text()
    assert "| interactive_evaluation | 1 |" in table and "| with_id | 1 |" in table
    assert "2 interactive evaluations" in compared.stdout
    rows = csv_rows(user / "compared" / "clicks_compare.csv")
    assert [int(r["paired_cases"]) for r in rows] == [0, 1]
