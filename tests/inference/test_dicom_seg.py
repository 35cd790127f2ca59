"""DICOM SEG output: predict.py writes one for a DICOM series (segments named and coloured as the
tables, referencing the series) that reads back to labels.nii.gz; geometry on a reversed oblique
series; empty predictions and off-grid instances; anonymised series (blank UIDs, missing modules)
and a series highdicom refuses."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from pydicom.uid import CTImageStorage, SegmentationStorage

from ctseg.colours import label_colours
from ctseg.config import CONFIG_DIR
from ctseg.errors import DatasetError, root_cause
from ctseg.inference.dicom_seg import (
    RAS_TO_LPS,
    SEG_FILE,
    read_dicom_seg,
    series_datasets,
    with_uids,
    write_dicom_seg,
)
from ctseg.inference.inputs import Case, load_case
from ctseg.inference.outputs import LABELS_FILE, MASKS_DIR, TIMING_FILE
from ctseg.inference.runner import CasesFailed, run
from ctseg.labels import label_names

NAMES = label_names("v1")


def predict_with_defaults(ckpt: Path, source: Path, output: Path, *overrides: str) -> int:
    """Run predict as `python predict.py` does: conf/predict.yaml composed with overrides."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose("predict", overrides=[f"ckpt={ckpt}", f"input={source}",
                                                f"output={output}", "device=cpu",
                                                "progress=false", *overrides])
        return run(cfg)
    except CasesFailed:
        return 1
    finally:
        GlobalHydra.instance().clear()


def test_predict_writes_a_dicom_seg_of_the_series_that_reads_back_to_the_labels(
        tiny_ckpt, shared_ct, tmp_path, caplog):
    ct = nib.load(shared_ct)
    crop = nib.Nifti1Image(np.asanyarray(ct.dataobj)[:64, :48, :20], ct.affine)
    inputs = tmp_path / "inputs"
    series_uid = write_dicom_series(crop, inputs / "scan")
    nib.save(crop, inputs / "plain.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ctseg.inference.runner"):
        assert predict_with_defaults(tiny_ckpt, inputs, out, "dicom_seg=true") == 0
    warnings = [r.getMessage() for r in caplog.records if "dicom_seg" in r.getMessage()]
    assert len(warnings) == 1 and "plain" in warnings[0] and "scan" not in warnings[0]
    assert not (out / "plain" / SEG_FILE).exists()
    case = out / "scan"
    assert sorted(p.name for p in case.iterdir() if p.name.startswith(".")) == []
    labels_img = nib.load(case / LABELS_FILE)
    labels = np.asanyarray(labels_img.dataobj)
    sources = series_datasets(inputs / "scan")

    seg = pydicom.dcmread(case / SEG_FILE)
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {i.ReferencedSOPInstanceUID
                  for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    assert seg.SeriesInstanceUID != series_uid
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    present = [int(v) for v in np.unique(labels) if v]
    assert len(present) > 3
    colours = label_colours(NAMES)
    assert [(s.SegmentNumber, s.SegmentLabel, list(s.RecommendedDisplayCIELabValue))
            for s in seg.SegmentSequence] == [
        (n, NAMES[v], list(hd.color.CIELabColor.from_rgb(*colours[v]).value))
        for n, v in enumerate(present, start=1)]
    back = read_dicom_seg(case / SEG_FILE, sources, labels_img.affine, NAMES)
    assert back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)


def small_crop(shared_ct: Path) -> nib.Nifti1Image:
    """A 32 x 24 x 8 corner of the shared CT (the tiny model predicts several structures)."""
    ct = nib.load(shared_ct)
    return nib.Nifti1Image(np.asanyarray(ct.dataobj)[:32, :24, :8], ct.affine)


def oblique_reversed_series(folder: Path) -> Path:
    """A 14 x 11 x 9 CT series with oblique, anisotropic voxels whose InstanceNumbers run
    against the slice axis (so the loaded volume's slices are in reverse file order)."""
    a, b = np.deg2rad(25), np.deg2rad(10)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = about_x @ about_z @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-40.0, 12.0, 300.0]
    data = np.random.default_rng(0).integers(-200, 200, (14, 11, 9)).astype(np.int16)
    write_dicom_series(nib.Nifti1Image(data, affine), folder,
                       edit=lambda k, ds: setattr(ds, "InstanceNumber", 9 - k))
    return folder


def test_hand_made_labels_on_a_reversed_oblique_series_round_trip(tmp_path, caplog):
    folder = oblique_reversed_series(tmp_path / "series")
    image, _ = load_case(Case("series", folder, "dicom"))
    affine = np.asarray(image.affine, dtype=np.float64)
    first = min((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: d.InstanceNumber)
    lps_origin = RAS_TO_LPS @ affine[:3, 3]
    np.testing.assert_allclose(lps_origin, np.asarray(first.ImagePositionPatient, float), atol=1e-4)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[2:6, 1:4, 0:3] = 1  # spleen
    labels[9:13, 7, 4:9] = 2  # kidney_right
    labels[10, 9, 7] = 5  # liver, one voxel
    sources = series_datasets(folder)
    path = write_dicom_seg(tmp_path / "out" / SEG_FILE, labels, affine, sources, NAMES)
    assert path == tmp_path / "out" / SEG_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [SEG_FILE]
    np.testing.assert_array_equal(read_dicom_seg(path, sources, affine, NAMES), labels)

    # Independent of ctseg's slice matching: highdicom's own volume, by world position.
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "kidney_right", "liver"]
    volume = seg.get_volume(combine_segments=True)
    to_seg = np.linalg.inv(volume.affine)
    for value, number in ((1, 1), (2, 2), (5, 3)):
        voxels = np.argwhere(labels == value)
        ras = affine[:3, :3] @ voxels.T + affine[:3, 3:]
        index = to_seg[:3, :3] @ (RAS_TO_LPS @ ras) + to_seg[:3, 3:]
        np.testing.assert_allclose(index, np.round(index), atol=1e-3)
        assert (volume.array[tuple(np.round(index).astype(int))] == number).all()
        assert (volume.array == number).sum() == len(voxels)

    with caplog.at_level(logging.WARNING, logger="ctseg.inference.dicom_seg"):
        assert write_dicom_seg(tmp_path / "empty" / SEG_FILE, np.zeros_like(labels), affine,
                               sources, NAMES) is None
    assert not (tmp_path / "empty" / SEG_FILE).exists()
    assert "no structure predicted; no DICOM SEG written" in caplog.text

    moved = pydicom.dcmread(sources[3].filename, stop_before_pixels=True)
    moved.ImagePositionPatient = [float(v) + 1.0 for v in moved.ImagePositionPatient]
    with pytest.raises(DatasetError, match=r"do not fall on a slice of the loaded volume"):
        write_dicom_seg(tmp_path / "moved" / SEG_FILE, labels, affine,
                        [*sources[:3], moved, *sources[4:]], NAMES)
    assert not (tmp_path / "moved").exists()


def test_a_series_off_its_grid_keeps_the_nifti_outputs_and_fails_the_case(
        tiny_ckpt, shared_ct, tmp_path):
    def move_slice_3(k: int, ds: pydicom.Dataset) -> None:
        if k == 3:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2],
                                       float(ds.ImagePositionPatient[2]) + 1.0]

    folder = tmp_path / "inputs" / "scan"
    write_dicom_series(small_crop(shared_ct), folder, edit=move_slice_3)
    moved = sorted(folder.iterdir())[3]
    out = tmp_path / "out"
    assert predict_with_defaults(tiny_ckpt, tmp_path / "inputs", out, "dicom_seg=true") == 1
    assert (out / "scan" / LABELS_FILE).is_file() and not (out / "scan" / SEG_FILE).exists()
    failed = json.loads((out / "timing.json").read_text())["failed"]
    assert len(failed) == 1 and failed[0]["case"] == "scan"
    assert failed[0]["error"].startswith(f"{moved}: ")
    assert f"the NIfTI outputs are in {out / 'scan'}" in failed[0]["error"]


def blank_uids(k: int, ds: pydicom.Dataset) -> None:
    """Anonymise as the issue's Siemens series: identifying UIDs present but empty (the file meta
    keeps MediaStorageSOPClassUID)."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, "")


def without_modules(k: int, ds: pydicom.Dataset) -> None:
    """Remove the Patient and Frame of Reference modules and the Type 2 SliceThickness (no General
    Equipment, Patient Study or Specimen attributes were written either)."""
    for keyword in ("PatientID", "FrameOfReferenceUID", "SliceThickness"):
        delattr(ds, keyword)


@pytest.mark.parametrize(("edit", "generated"), [
    (blank_uids, ("StudyInstanceUID", "SeriesInstanceUID")),
    (without_modules, ("FrameOfReferenceUID",)),
], ids=["blank_uids", "missing_modules"])
def test_an_anonymised_series_gets_a_seg_that_reads_back_to_the_labels(
        tiny_ckpt, shared_ct, tmp_path, caplog, edit, generated):
    folder = tmp_path / "inputs" / "scan"
    write_dicom_series(small_crop(shared_ct), folder, edit=edit)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ctseg.inference.dicom_seg"):
        assert predict_with_defaults(tiny_ckpt, tmp_path / "inputs", out, "dicom_seg=true") == 0
    notes = [r.getMessage() for r in caplog.records
             if "blank or missing attributes" in r.getMessage()]
    case = out / "scan"
    assert (case / LABELS_FILE).is_file() and any((case / MASKS_DIR).glob("*.nii.gz"))
    seg = hd.seg.segread(case / SEG_FILE)
    sources = series_datasets(folder)
    completed, _ = with_uids(sources)  # derived again: the same UIDs as in the SEG
    referenced = seg.ReferencedSeriesSequence[0]
    series_uid = referenced.SeriesInstanceUID
    uids = {"StudyInstanceUID": seg.StudyInstanceUID, "SeriesInstanceUID": series_uid,
            "FrameOfReferenceUID": seg.FrameOfReferenceUID}
    assert len(notes) == 1 and notes[0].startswith(f"DICOM series {folder}: ")
    for keyword, uid in uids.items():
        assert uid and uid == completed[0].get(keyword)
        assert (f"{keyword} {uid}" in notes[0]) == (keyword in generated)
    assert series_uid != seg.SeriesInstanceUID
    assert {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in referenced.ReferencedInstanceSequence} == {
        (CTImageStorage, ds.SOPInstanceUID) for ds in completed}
    if edit is blank_uids:
        assert "the SOPInstanceUIDs of 8 instance(s)" in notes[0]
        assert f"SOPClassUID of 8 instance(s) from the file meta ({CTImageStorage})" in notes[0]
        assert {ds.SOPInstanceUID for ds in sources} == {""}  # the input was not changed
    else:
        assert seg.PatientID == "" and "PatientID" not in sources[0]
        assert "took the SliceThickness from the slice spacing (3.0 mm)" in notes[0]
        pixel_measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert float(pixel_measures.SliceThickness) == 3.0
    labels_img = nib.load(case / LABELS_FILE)
    labels = np.asanyarray(labels_img.dataobj)
    assert len(np.unique(labels)) > 2
    np.testing.assert_array_equal(
        read_dicom_seg(case / SEG_FILE, sources, labels_img.affine, NAMES), labels)


def test_an_instance_without_a_sop_class_anywhere_is_named(tmp_path):
    sources = series_datasets(oblique_reversed_series(tmp_path / "series"))
    completed, notes = with_uids(sources)
    assert all(c is s for c, s in zip(completed, sources, strict=True)) and notes == []
    classless = pydicom.dcmread(sources[4].filename, stop_before_pixels=True)
    classless.SOPClassUID = ""
    del classless.file_meta.MediaStorageSOPClassUID
    with pytest.raises(DatasetError, match=rf"^{re.escape(sources[4].filename)}: no SOPClassUID"):
        with_uids([*sources[:4], classless, *sources[5:]])


def test_a_series_highdicom_refuses_keeps_the_nifti_outputs_and_names_the_reason(
        tiny_ckpt, shared_ct, tmp_path, caplog):
    def other_study_on_slice_5(k: int, ds: pydicom.Dataset) -> None:
        if k == 5:
            ds.StudyInstanceUID = "1.2.3.4"

    folder = tmp_path / "inputs" / "scan"
    write_dicom_series(small_crop(shared_ct), folder, edit=other_study_on_slice_5)
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG, logger="ctseg.inference.runner"):
        assert predict_with_defaults(tiny_ckpt, tmp_path / "inputs", out, "dicom_seg=true") == 1
    case = out / "scan"
    assert (case / LABELS_FILE).is_file() and any((case / MASKS_DIR).glob("*.nii.gz"))
    assert not (case / SEG_FILE).exists()
    failed = json.loads((out / TIMING_FILE).read_text())["failed"]
    assert len(failed) == 1 and failed[0]["case"] == "scan"
    assert failed[0]["error"].startswith(
        f"{folder}: highdicom cannot build a DICOM SEG of this series (ValueError: Source images "
        "must all be part of the same series")
    assert failed[0]["error"].endswith(f"(no {SEG_FILE}; the NIfTI outputs are in {case}, "
                                       "overwrite=true redoes the case)")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "failed:" in r.msg]
    assert [r.getMessage() for r in errors] == [f"{folder} failed: {failed[0]['error']}"]
    assert errors[0].exc_info is None  # one console line; the traceback is a debug record
    traceback = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(traceback) == 1 and isinstance(traceback[0].exc_info[1], DatasetError)
    assert isinstance(root_cause(traceback[0].exc_info[1]), ValueError)
