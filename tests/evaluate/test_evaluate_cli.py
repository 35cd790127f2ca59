"""python -m ctseg.evaluate on the shared crop: its own masks score 1, outputs are written, a grid
mismatch names both files."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest

from ctseg.atomic import TEMP_MARK
from ctseg.data.merge import prepare
from ctseg.data.phantoms import write_phantoms
from ctseg.errors import DatasetError
from ctseg.evaluate.__main__ import evaluate
from ctseg.evaluate.report import OUTPUTS, region
from ctseg.inference.prompts import output_names
from ctseg.labels import label_names
from ctseg.vista3d_labels import vista3d_ids

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def merged(shared_data: Path, tmp_path: Path) -> Path:
    """predict.py's layout holding the shared crop's merged v1 label map as its prediction."""
    label = Path(prepare(shared_data, out=tmp_path / "prepared", version="v1").records[0]["label"])
    pred = tmp_path / "pred" / "s0001"
    pred.mkdir(parents=True)
    shutil.copy(label, pred / "labels.nii.gz")
    return tmp_path / "pred"


def test_the_crops_own_masks_score_one(merged, shared_data, tmp_path, tree_digest):
    before = tree_digest(shared_data)
    result = subprocess.run([sys.executable, "-m", "ctseg.evaluate", f"pred={merged}",
                             f"gt={shared_data}", "version=v1", "progress=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_digest(shared_data) == before  # the raw dataset is only read
    out = merged / "evaluation"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(OUTPUTS)
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 104 and {r["case"] for r in rows} == {"s0001"}
    scored = [r for r in rows if r["dice"] != "nan"]
    assert len(scored) >= 20  # the structures present in the crop
    assert all(float(r["dice"]) == 1.0 and float(r["nsd"]) == pytest.approx(1.0) for r in scored)
    absent = [r for r in rows if r["dice"] == "nan"]
    assert all(r["nsd"] == "nan" for r in absent)  # empty in both: excluded
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["dice"]["mean"] == 1.0 and summary["tolerance_mm"] == 3.0
    assert summary["classes"]["liver"]["region"] == "organs"
    assert "| vertebrae |" in (out / "summary.md").read_text()
    for name in ("dice_per_class.png", "dice_per_region.png"):
        image = plt.imread(out / name)
        assert image[..., :3].std() > 0.05  # drawn, not blank


def test_a_folder_of_label_maps_and_a_wrong_grid(merged, tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    img = nib.load(merged / "s0001" / "labels.nii.gz")
    labels = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), truth / "s0001.nii.gz")
    summary = evaluate({"pred": merged, "gt": truth, "progress": False,
                        "output": tmp_path / "out"})
    assert summary["overall"]["nsd"]["mean"] == pytest.approx(1.0)
    nib.save(nib.Nifti1Image(labels[:, :, 1:], img.affine, img.header), truth / "s0001.nii.gz")
    with pytest.raises(DatasetError, match=r"labels.nii.gz: grid \(.*\) differs from the ground "
                                           r"truth .*truth/s0001.nii.gz"):
        evaluate({"pred": merged, "gt": truth, "progress": False, "output": tmp_path / "out2"})


def test_regions_group_the_structures():
    assert [region(n) for n in ("vertebrae_L1", "rib_left_3", "aorta", "gluteus_maximus_left",
                                "femur_left", "liver")] == [
        "vertebrae", "ribs", "cardiovascular", "muscles", "other bones", "organs"]


def test_a_mistyped_prediction_folder_is_named_and_not_created(shared_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ctseg.evaluate", f"pred={tmp_path / 'nope'}",
                             f"gt={shared_data}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert f"error: pred={tmp_path / 'nope'}: no such folder" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_an_unknown_version_is_one_line(shared_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ctseg.evaluate", f"pred={tmp_path}",
                             f"gt={shared_data}", "version=v3"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: version=v3: unknown TotalSegmentator version 'v3'; "
                      "choose one of v1, v2"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "evaluation").exists()


def test_vista3d_predictions_are_scored_by_structure_name(merged, shared_data, tmp_path, caplog):
    # predict.py with a VISTA3D checkpoint writes VISTA3D ids and their names in labels.json
    names = label_names("v1")
    ids = vista3d_ids(names)
    to_vista = np.array([i or 0 for i in ids], dtype=np.uint8)
    case = merged / "s0001"
    img = nib.load(case / "labels.nii.gz")
    truth = np.asarray(img.dataobj)
    present = sorted(int(v) for v in np.unique(truth) if v)
    predicted = to_vista[truth]
    predicted[truth == names.index("spleen")] = 254  # a zero-shot id: no TotalSegmentator class
    nib.save(nib.Nifti1Image(predicted, img.affine, img.header), case / "labels.nii.gz")
    table = output_names(sorted({int(v) for v in np.unique(predicted) if v}))
    (case / "labels.json").write_text(json.dumps({str(k): v for k, v in table.items()}))
    summary = evaluate({"pred": merged, "gt": shared_data, "progress": False})
    scored = summary["classes"]
    for c in present:
        expected = 1.0 if ids[c] and names[c] != "spleen" else 0.0
        assert scored[names[c]]["dice"]["mean"] == expected, names[c]
    assert "count as background: " + table[254] in caplog.text
    # labels.json of the evaluated version itself (predict.py with a SegResNet) changes nothing
    nib.save(nib.Nifti1Image(truth, img.affine, img.header), case / "labels.nii.gz")
    (case / "labels.json").write_text(json.dumps(dict(enumerate(names))))
    assert evaluate({"pred": merged, "gt": shared_data, "progress": False}
                    )["overall"]["dice"]["mean"] == 1.0


def test_a_corrupt_prediction_is_named(merged, shared_data):
    (merged / "s0001" / "labels.nii.gz").write_bytes(b"not a NIfTI file")
    with pytest.raises(DatasetError, match=r"s0001/labels\.nii\.gz: corrupt or truncated NIfTI "
                                           r"file .*; predict the case again"):
        evaluate({"pred": merged, "gt": shared_data, "progress": False})


def test_a_label_map_of_another_version_is_refused(merged, shared_data, tmp_path):
    """TotalSegmentator's own v2 map of the crop scored as v1 (no labels.json beside it): its
    values above 104 are named, not silently counted as background."""
    shutil.copy(shared_data / "s0001" / "label_totalseg_v2.nii.gz",
                merged / "s0001" / "labels.nii.gz")
    result = subprocess.run([sys.executable, "-m", "ctseg.evaluate", f"pred={merged}",
                             f"gt={shared_data}", "version=v1", "progress=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"{merged / 's0001' / 'labels.nii.gz'}: label values " in errors[0]
    assert "are above the 104 classes of version=v1" in errors[0]
    assert not (merged / "evaluation").exists()


def test_a_failed_evaluation_leaves_the_previous_outputs_whole(merged, shared_data, tree_digest,
                                                               monkeypatch):
    """The five outputs are written together: a failure while drawing the figures (after the
    tables are written) leaves the previous evaluation byte-identical, no temporary folder."""
    cfg = {"pred": merged, "gt": shared_data, "version": "v1", "progress": False}
    evaluate(cfg)
    before = tree_digest(merged)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr("ctseg.evaluate.report.plot", broken_plot)
    with pytest.raises(RuntimeError, match="figure failed"):
        evaluate(cfg)
    assert tree_digest(merged) == before
    assert not [p for p in merged.iterdir() if TEMP_MARK in p.name]


def test_each_dataset_is_scored_on_the_classes_it_annotates(merged, shared_data, tmp_path):
    # Ground truth: the crop (TotalSegmentator layout) and nnU-Net phantoms labelling two
    # structures. Predictions of the phantoms: every structure (the TotalSegmentator-layout
    # phantoms of the same seed have the same CTs), so scoring a class the dataset does not
    # annotate would give 0.
    half = tmp_path / "half"
    write_phantoms(half, 4, seed=3, shape=(24, 24, 16), layout="nnunet",
                   structures=["liver", "aorta"])
    full = prepare(write_phantoms(tmp_path / "full", 4, seed=3, shape=(24, 24, 16))[0].parent,
                   out=tmp_path / "prepared_full")
    for i, record in enumerate(sorted(full.records, key=lambda r: r["image_id"])):
        (merged / f"phantom_{i + 1:04d}").mkdir()
        shutil.copy(record["label"], merged / f"phantom_{i + 1:04d}" / "labels.nii.gz")
    summary = evaluate({"pred": merged, "gt": [shared_data, half], "progress": False,
                        "output": tmp_path / "out"})
    with (tmp_path / "out" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    phantoms = [r for r in rows if r["dataset"] == "half"]
    assert {r["case"] for r in phantoms} == {f"phantom_{i:04d}" for i in range(1, 5)}
    assert {r["structure"] for r in phantoms} == {"liver", "aorta"}
    assert all(float(r["dice"]) == 1.0 for r in phantoms)
    assert len([r for r in rows if r["dataset"] == "totalseg_mini"]) == 104
    assert set(summary["datasets"]) == {"totalseg_mini", "half"}
    assert summary["datasets"]["half"]["cases"] == 4
    assert summary["datasets"]["half"]["dice"] == {"mean": 1.0, "median": 1.0, "n": 2}
    assert "| half | 1.0000 | 1.0000 | 2 | 4 |" in (tmp_path / "out" / "summary.md").read_text()
    # labelsTs only: the phantoms' test split
    tested = evaluate({"pred": merged, "gt": half, "split": "test", "progress": False,
                       "output": tmp_path / "test"})
    assert 0 < len(tested["cases"]) < 4 and "datasets" not in tested
