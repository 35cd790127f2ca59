"""predict: geometry restored, DICOM = NIfTI, outputs, bad inputs, batches, skip/overwrite, CLI,
failure messages and where their tracebacks are logged."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import save_checkpoint, tiny_module, write_dicom_series
from nibabel.orientations import axcodes2ornt, ornt_transform

from ctseg.config import CONFIG_DIR
from ctseg.data.layout import DatasetError
from ctseg.errors import reported
from ctseg.inference.outputs import (
    ITKSNAP_TABLE,
    LABELS_FILE,
    LABELS_JSON,
    MASKS_DIR,
    PROBABILITIES_DIR,
    SLICER_TABLE,
    TIMING_FILE,
)
from ctseg.inference.pipeline import seg_failure
from ctseg.inference.record import RECORD_FILE
from ctseg.inference.runner import CasesFailed, failure_message, run
from ctseg.labels import label_names

REPO = Path(__file__).resolve().parents[2]


def predict(ckpt: Path, source: Path, output: Path, **options) -> int:
    """Run the batch predictor on CPU without a progress bar; the exit status predict.py gives
    (1 when a case failed, after the others are written)."""
    try:
        return run({"ckpt": str(ckpt), "input": str(source), "output": str(output),
                    "device": "cpu", "progress": False, **options})
    except CasesFailed:
        return 1


def labels_of(folder: Path) -> nib.Nifti1Image:
    """The multilabel map of one case folder."""
    return nib.load(folder / LABELS_FILE)


def reorient(img: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> nib.Nifti1Image:
    """`img` with its voxel axes permuted/flipped to `axcodes` (same world positions)."""
    transform = ornt_transform(nib.io_orientation(img.affine), axcodes2ornt(axcodes))
    return img.as_reoriented(transform)


@pytest.fixture(scope="module")
def anisotropic(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared CT with every other slice (3 x 3 x 6 mm), as RAS and as a PIL-oriented copy."""
    folder = tmp_path_factory.mktemp("aniso")
    ct = nib.load(shared_ct)
    data = np.asanyarray(ct.dataobj)[:, :, ::2]
    affine = ct.affine.copy()
    affine[:3, 2] *= 2
    ras = nib.Nifti1Image(data, affine, ct.header)
    paths = {"ras": folder / "ras.nii.gz", "pil": folder / "pil.nii.gz"}
    nib.save(ras, paths["ras"])
    nib.save(reorient(ras, ("P", "I", "L")), paths["pil"])
    return paths


def test_output_geometry_equals_non_ras_anisotropic_input(tiny_ckpt, anisotropic, tmp_path):
    assert predict(tiny_ckpt, anisotropic["pil"].parent, tmp_path / "out") == 0
    source, ras_in = nib.load(anisotropic["pil"]), nib.load(anisotropic["ras"])
    assert nib.aff2axcodes(source.affine) == ("P", "I", "L")
    out = labels_of(tmp_path / "out" / "pil")
    assert out.shape == source.shape
    np.testing.assert_array_equal(out.affine, source.affine)
    assert out.header.get_data_dtype() == np.uint8
    assert out.header.get_zooms() == source.header.get_zooms()
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (
        int(source.header["qform_code"]), int(source.header["sform_code"]))
    # Same anatomy, other voxel order: the labels are the RAS prediction reoriented.
    ras_labels = labels_of(tmp_path / "out" / "ras")
    assert ras_labels.shape == ras_in.shape
    back = reorient(out, ("R", "A", "S"))
    np.testing.assert_allclose(back.affine, ras_labels.affine, atol=1e-4)
    same = (np.asanyarray(back.dataobj) == np.asanyarray(ras_labels.dataobj)).mean()
    assert same >= 0.999
    assert len(np.unique(np.asanyarray(out.dataobj))) > 5


def test_outputs_masks_tables_probabilities_and_timing(tiny_ckpt, shared_ct, tmp_path):
    out = tmp_path / "out"
    assert predict(tiny_ckpt, shared_ct, out, probabilities=["liver", 2]) == 0
    case = out / "ct"
    labels = np.asanyarray(labels_of(case).dataobj)
    names = label_names("v1")
    assert json.loads((case / LABELS_JSON).read_text()) == {str(i): n for i, n in enumerate(names)}
    masks = sorted(p.name for p in (case / MASKS_DIR).iterdir())
    assert masks == sorted(f"{n}.nii.gz" for n in names[1:])
    for index in np.unique(labels)[1:4]:
        mask = nib.load(case / MASKS_DIR / f"{names[index]}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(mask.dataobj), labels == index)
    slicer = (case / SLICER_TABLE).read_text().splitlines()
    assert slicer[2].split()[:2] == ["0", "background"] and slicer[3].split()[:2] == ["1", "spleen"]
    assert len([line for line in slicer if not line.startswith("#")]) == 105
    snap = [line for line in (case / ITKSNAP_TABLE).read_text().splitlines()
            if not line.startswith("#")]
    assert len(snap) == 105 and snap[1].split()[0] == "1" and snap[1].endswith('"spleen"')
    probs = {p.name: nib.load(p) for p in (case / PROBABILITIES_DIR).iterdir()}
    assert sorted(probs) == ["kidney_right.nii.gz", "liver.nii.gz"]
    liver = np.asanyarray(probs["liver.nii.gz"].dataobj)
    assert liver.shape == labels.shape and liver.min() >= 0 and liver.max() <= 1
    timing = json.loads((out / TIMING_FILE).read_text())
    seconds = timing["cases"][0]["seconds"]
    assert set(seconds) == {"load", "preprocess", "inference", "postprocess", "save", "total"}
    assert timing["cases"][0]["peak_rss_mb"] > 0 and timing["failed"] == []


def test_dicom_series_gives_the_same_labels_as_nifti(tiny_ckpt, shared_ct, tmp_path):
    series = tmp_path / "series"
    write_dicom_series(nib.load(shared_ct), series)
    assert predict(tiny_ckpt, shared_ct, tmp_path / "out") == 0
    assert predict(tiny_ckpt, series, tmp_path / "out", masks=False) == 0
    nifti, dicom = labels_of(tmp_path / "out" / "ct"), labels_of(tmp_path / "out" / "series")
    assert dicom.shape == nifti.shape
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(dicom.dataobj), np.asanyarray(nifti.dataobj))


def test_dicom_folder_with_several_series_lists_them_and_lets_the_user_pick(
        tiny_ckpt, shared_ct, tmp_path):
    ct = nib.load(shared_ct)
    small = nib.Nifti1Image(np.asanyarray(ct.dataobj)[:40, :40, :12], ct.affine)
    folder = tmp_path / "study"
    first = write_dicom_series(small, folder, description="soft tissue")
    second = write_dicom_series(small, folder, description="bone kernel")
    out = tmp_path / "out"
    assert predict(tiny_ckpt, folder, out) == 1
    failed = json.loads((out / TIMING_FILE).read_text())["failed"][0]["error"]
    assert str(folder) in failed and "2 DICOM series" in failed
    assert f"{first}  soft tissue  CT  12 files" in failed and second in failed
    assert not (out / "study").exists()
    assert predict(tiny_ckpt, folder, out, series_uid=second) == 0
    assert labels_of(out / "study").shape == (40, 40, 12)


def _bad_inputs(folder: Path, shared_ct: Path) -> dict[str, tuple[Path, str]]:
    """One bad input per problem, with the error text expected for it."""
    folder.mkdir()
    ct = nib.load(shared_ct)
    data = np.asanyarray(ct.dataobj)
    nib.save(nib.Nifti1Image(data[:, :, 0], ct.affine), folder / "slice2d.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), ct.affine), folder / "twovolumes.nii.gz")
    (folder / "corrupt.nii.gz").write_bytes(shared_ct.read_bytes()[:5000])
    (folder / "empty").mkdir()
    write_dicom_series(nib.Nifti1Image(data[:20, :20, :6], ct.affine), folder / "mr",
                       modality="MR")
    header = ct.header.copy()
    header["srow_z"] = [0, 0, 0, header["srow_z"][3]]  # a broken sform: no extent along z
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(data, None, header), folder / "flat.nii.gz")
    return {
        "flat": (folder / "flat.nii.gz", "invalid voxel-to-world affine"),
        "slice2d": (folder / "slice2d.nii.gz", "expected a 3-D CT volume"),
        "twovolumes": (folder / "twovolumes.nii.gz", "time series or multi-channel"),
        "corrupt": (folder / "corrupt.nii.gz", "corrupt"),
        "mr": (folder / "mr", "modality MR, not CT"),
    }


def test_each_bad_input_is_named_and_the_batch_goes_on(tiny_ckpt, shared_ct, tmp_path):
    inputs = tmp_path / "inputs"
    bad = _bad_inputs(inputs, shared_ct)
    good = nib.load(shared_ct)
    nib.save(nib.Nifti1Image(np.asanyarray(good.dataobj)[:50, :50, :20], good.affine),
             inputs / "good.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(good.dataobj)[:50, :50, :20, None], good.affine),
             inputs / "single4d.nii.gz")
    out = tmp_path / "out"
    assert predict(tiny_ckpt, inputs, out) == 1
    timing = json.loads((out / TIMING_FILE).read_text())
    errors = {f["case"]: f["error"] for f in timing["failed"]}
    assert set(errors) == set(bad)
    for name, (path, message) in bad.items():
        assert errors[name].startswith(str(path)) and message in errors[name]
    assert [c["case"] for c in timing["cases"]] == ["good", "single4d"]
    assert labels_of(out / "good").shape == (50, 50, 20)
    assert labels_of(out / "single4d").shape == (50, 50, 20)
    assert sorted(p.name for p in out.iterdir()) == ["good", "single4d", TIMING_FILE]


def test_missing_and_empty_inputs_raise(tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty input folder"):
        predict(tiny_ckpt, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DatasetError, match="input not found"):
        predict(tiny_ckpt, tmp_path / "nothing.nii.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def refused(ckpt: Path, source: Path, output: Path, capsys, **options) -> str:
    """The one line predict.py prints on stderr when it exits 1 before predicting."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, reported("predict.py"):
        predict(ckpt, source, output, **options)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_case_is_skipped_only_when_the_same_model_and_settings_wrote_it(
        tiny_ckpt, shared_ct, tmp_path, capsys):
    """A rerun skips a case folder its model (SHA-256) and settings wrote; another model, other
    settings, or a folder without a record (written before records were) stop the run with one
    line naming the case and overwrite=true, the folder untouched; overwrite=true replaces it."""
    out = tmp_path / "out"
    assert predict(tiny_ckpt, shared_ct, out, masks=False) == 0
    record = json.loads((out / "ct" / RECORD_FILE).read_text())
    assert record["models"] == [{"source": str(tiny_ckpt),
                                 "sha256": hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()}]
    assert record["options"]["sw.overlap"] == 0.25 and record["options"]["tta"] is None
    assert record["data"]["spacing"] == [4.0, 4.0, 4.0] and len(record["classes"]) == 105
    stamp = (out / "ct" / LABELS_FILE).stat().st_mtime_ns
    assert predict(tiny_ckpt, shared_ct, out, masks=False) == 0
    assert (out / "ct" / LABELS_FILE).stat().st_mtime_ns == stamp
    assert json.loads((out / TIMING_FILE).read_text())["skipped"] == ["ct"]
    other = save_checkpoint(tiny_module(seed=1), tmp_path / "other.ckpt")
    fix = "set overwrite=true to predict it again, or choose another output folder"
    case = f"error: {out / 'ct'}: exists and is not skipped"
    assert refused(other, shared_ct, out, capsys, masks=False) == (
        f"{case}: it was written by another model (the SHA-256 of ckpt={other} differs from the "
        f"recorded one); {fix}")
    assert refused(tiny_ckpt, shared_ct, out, capsys, masks=False, sw={"overlap": 0.5}) == (
        f"{case}: it was written with sw.overlap=0.25 (this run: 0.5); {fix}")
    assert refused(tiny_ckpt, shared_ct, out, capsys, masks=False, tta="mirror") == (
        f"{case}: it was written with tta=null (this run: mirror); {fix}")
    assert refused(tiny_ckpt, shared_ct, out, capsys, masks=True) == (
        f"{case}: it was written with masks=false (this run: true); {fix}")
    assert refused(tiny_ckpt, shared_ct, out, capsys, masks=False,
                   data={"spacing": 5.0}) == (
        f"{case}: it was written with data.spacing=[4.0, 4.0, 4.0] (this run: [5.0, 5.0, 5.0]); "
        f"{fix}")
    (out / "ct" / RECORD_FILE).unlink()  # as a case folder written before the record was
    assert refused(tiny_ckpt, shared_ct, out, capsys, masks=False) == (
        f"{case}: it was written before ctseg recorded the model and settings of a case (no "
        f"{RECORD_FILE}), so it may come from another model or settings; {fix}")
    assert (out / "ct" / LABELS_FILE).stat().st_mtime_ns == stamp
    assert predict(other, shared_ct, out, masks=True, overwrite=True) == 0
    assert (out / "ct" / LABELS_FILE).stat().st_mtime_ns != stamp
    assert (out / "ct" / MASKS_DIR / "liver.nii.gz").is_file()
    assert json.loads((out / "ct" / RECORD_FILE).read_text())["models"][0]["source"] == str(other)
    assert not [p for p in out.iterdir() if p.name.startswith(".ct.")]


def test_bare_state_dict_uses_the_config_and_class_mismatch_is_named(shared_ct, tmp_path):
    module = tiny_module()
    bundle = tmp_path / "model.pt"
    torch.save(module.net.state_dict(), bundle)
    data = {"version": "v1", "spacing": 4.0, "patch_size": [32, 32, 32]}
    config = {"model": {"num_classes": 105, "init_filters": 8}, "data": data}
    # The checkpoint records training with the segresnet scheme's smoothing (sigma 0.4).
    ckpt = save_checkpoint(module, tmp_path / "same.ckpt")
    assert predict(ckpt, shared_ct, tmp_path / "ckpt", masks=False) == 0
    assert predict(bundle, shared_ct, tmp_path / "smoothed", masks=False, model=config["model"],
                   data={**data, "smooth_sigma": 0.4}) == 0
    np.testing.assert_array_equal(np.asanyarray(labels_of(tmp_path / "smoothed" / "ct").dataobj),
                                  np.asanyarray(labels_of(tmp_path / "ckpt" / "ct").dataobj))
    # A bare state dict follows the bundle's inference.json, which does not smooth.
    assert predict(bundle, shared_ct, tmp_path / "bare", masks=False, **config) == 0
    bare = np.asanyarray(labels_of(tmp_path / "bare" / "ct").dataobj)
    assert (bare != np.asanyarray(labels_of(tmp_path / "ckpt" / "ct").dataobj)).mean() > 0.01
    wrong = {"model": {"num_classes": 118, "init_filters": 8},
             "data": {"version": "v2", "spacing": 4.0}}
    with pytest.raises(ValueError, match=r"model\.pt: the weights have 105 output classes but .* "
                                         r"expect 118"):
        predict(bundle, shared_ct, tmp_path / "wrong", **wrong)
    ckpt_v2 = save_checkpoint(tiny_module(), tmp_path / "v2.ckpt", version="v2")
    with pytest.raises(ValueError, match=r"v2\.ckpt: .* give 105 classes but TotalSegmentator "
                                         r"v2 has 118"):
        predict(ckpt_v2, shared_ct, tmp_path / "wrong")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.ckpt: cannot read the checkpoint"):
        predict(tmp_path / "broken.ckpt", shared_ct, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_predict_cli_runs_through_hydra(tiny_ckpt, shared_ct, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, str(REPO / "predict.py"), f"ckpt={tiny_ckpt}",
               f"input={shared_ct}", f"output={out}", "device=cpu", "masks=false",
               "progress=false", "sw.overlap=0.5"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert labels_of(out / "ct").shape == nib.load(shared_ct).shape
    assert "total" in done.stderr + done.stdout
    bad = subprocess.run([*command[:3], f"input={tmp_path / 'missing.nii.gz'}", f"output={out}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode != 0 and "missing.nii.gz: input not found" in bad.stderr


def test_totalsegmentator_root_gives_one_case_per_subject(tmp_path: Path) -> None:
    from ctseg.inference.inputs import discover_cases

    for subject in ("s0002", "s0001"):
        (tmp_path / subject / "segmentations").mkdir(parents=True)
        (tmp_path / subject / "ct.nii.gz").write_bytes(b"")
    (tmp_path / "extra.nii.gz").write_bytes(b"")
    (tmp_path / "meta.csv").write_text("image_id;split\n")
    cases = discover_cases(tmp_path)
    assert [(c.name, c.path.relative_to(tmp_path).as_posix()) for c in cases] == [
        ("extra", "extra.nii.gz"), ("s0001", "s0001/ct.nii.gz"), ("s0002", "s0002/ct.nii.gz")]


def test_a_failure_message_is_never_empty_and_names_a_foreign_error_type(tmp_path):
    assert failure_message(KeyError("")) == "KeyError: ''"
    assert failure_message(RuntimeError()) == "RuntimeError"
    wrapped = RuntimeError("applying transform <Spacingd>")
    wrapped.__cause__ = DatasetError(tmp_path / "ct.nii.gz", "corrupt")
    assert failure_message(wrapped) == f"{tmp_path / 'ct.nii.gz'}: corrupt"
    kept = f"the NIfTI outputs are in {tmp_path / 'out'}, overwrite=true redoes the case"
    assert failure_message(seg_failure(KeyError(""), tmp_path / "scan", tmp_path / "out")) == (
        f"RuntimeError: {tmp_path / 'scan'}: writing the DICOM SEG failed (KeyError: ''); "
        f"no seg.dcm; {kept}")
    assert failure_message(seg_failure(DatasetError(tmp_path / "a.dcm", "off the grid"),
                                       tmp_path / "scan", tmp_path / "out")) == (
        f"{tmp_path / 'a.dcm'}: off the grid (no seg.dcm; {kept})")


LOG_RECORDS = """
import json, logging.config, sys
logging.config.dictConfig(json.loads(sys.argv[1]))
try:
    raise KeyError("")
except KeyError:
    logging.getLogger("ctseg.inference.runner").error("scan failed: KeyError: ''")
    logging.getLogger("ctseg.inference.runner").debug("scan: traceback", exc_info=True)
logging.getLogger("highdicom.base").debug("copied attribute")
"""


def test_predict_logging_keeps_failure_tracebacks_out_of_the_console_and_in_the_file(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("predict", overrides=["ckpt=x", "input=y", f"output={tmp_path}"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    logging_cfg = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    logging_cfg["handlers"]["file"]["filename"] = str(tmp_path / "predict.log")
    done = subprocess.run([sys.executable, "-c", LOG_RECORDS, json.dumps(logging_cfg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "scan failed: KeyError: ''" in done.stdout and "Traceback" not in done.stdout
    log_file = (tmp_path / "predict.log").read_text()
    assert "scan failed: KeyError: ''" in log_file and "scan: traceback" in log_file
    assert "scan: traceback\nTraceback (most recent call last):" in log_file
    assert log_file.endswith("KeyError: ''\n") and "copied attribute" not in log_file
