"""`python -m ctseg.data phantoms OUT --size wholebody`: a simulated TotalSegmentator v2 download
(at a small --scale here): its layout, grids, orientations, reproducibility, and that check and
prepare accept it."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctseg.data.__main__ import main
from ctseg.data.simulated_download import write_wholebody_phantoms
from ctseg.labels import label_names

SCALE = 0.0625
N = 4
SEED = 5
# The v2 download's meta.csv header (TotalSegmentator v2.0.1, Zenodo 10047292).
V2_HEADER = ["image_id", "age", "gender", "institute", "study_type", "split", "manufacturer",
             "scanner_model", "kvp", "pathology", "pathology_location"]


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four subjects written by the command line at 1/16 of a real CT's voxel counts."""
    root = tmp_path_factory.mktemp("simulated") / "download"
    assert main(["phantoms", str(root), "--n", str(N), "--seed", str(SEED), "--size",
                 "wholebody", "--scale", str(SCALE)]) == 0
    return root


def _subjects(root: Path) -> list[Path]:
    """The subject folders of a download."""
    return sorted(p for p in root.iterdir() if p.is_dir())


def _array(path: Path) -> np.ndarray:
    """Voxels of a NIfTI file in their stored dtype."""
    return np.asanyarray(nib.load(path).dataobj)


def test_layout_is_the_v2_download_at_scale(download: Path) -> None:
    lines = (download / "meta.csv").read_text().splitlines()
    rows = list(csv.DictReader(lines, delimiter=";"))
    assert lines[0].split(";") == V2_HEADER
    assert [r["image_id"] for r in rows] == ["s0001", "s0002", "s0003", "s0004"]
    assert sorted(r["split"] for r in rows) == ["test", "train", "train", "val"]
    masks = {f"{name}.nii.gz" for name in label_names("v2")[1:]}
    assert len(masks) == 117
    codes = set()
    for folder in _subjects(download):
        assert {p.name for p in (folder / "segmentations").iterdir()} == masks
        for path in (folder / "ct.nii.gz", folder / "segmentations" / "liver.nii.gz"):
            assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as downloaded
        ct = nib.load(folder / "ct.nii.gz")
        x, y, z = ct.shape
        dx, dy, dz = (float(v) for v in ct.header.get_zooms())
        assert x == y == round(512 * SCALE) and round(200 * SCALE) <= z <= round(800 * SCALE)
        assert 0.7 <= dx == dy <= 0.9 and 1.5 <= dz <= 5.0, (dx, dy, dz)
        assert ct.get_data_dtype() == np.int16
        codes.add(nib.aff2axcodes(ct.affine))
        drawn = 0
        total = np.zeros(ct.shape, np.int32)
        for name in masks:
            mask = nib.load(folder / "segmentations" / name)
            data = np.asanyarray(mask.dataobj)
            assert mask.get_data_dtype() == np.uint8 and mask.shape == ct.shape
            assert np.array_equal(mask.affine, ct.affine) and set(np.unique(data)) <= {0, 1}
            drawn += bool(data.any())
            total += data
        assert 5 <= drawn <= 20, drawn  # most of the 117 masks are empty
        assert total.max() == 1
    # axis flips of RAS, more than one
    assert len(codes) > 1 and codes <= {("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"),
                                        ("R", "P", "S")}, codes


def test_the_anatomy_is_the_same_in_the_world_whatever_the_flips(download: Path) -> None:
    """The liver lies right (+x in RAS world) of the spleen and the vertebra behind the aorta
    (-y) in every subject, whichever axes its file flips."""
    def centre(folder: Path, name: str) -> np.ndarray:
        mask = nib.load(folder / "segmentations" / f"{name}.nii.gz")
        return nib.affines.apply_affine(mask.affine, np.argwhere(np.asanyarray(mask.dataobj))
                                        .mean(axis=0))

    for folder in _subjects(download):
        assert centre(folder, "liver")[0] > centre(folder, "spleen")[0] + 3, folder.name
        assert centre(folder, "aorta")[1] > centre(folder, "vertebrae_L1")[1], folder.name


def test_same_seed_same_files_other_seed_other_volumes(download: Path, tmp_path: Path) -> None:
    again = write_wholebody_phantoms(tmp_path / "again", N, seed=SEED, scale=SCALE)
    other = write_wholebody_phantoms(tmp_path / "other", 1, seed=SEED + 1, scale=SCALE)
    for folder in again:
        for path in folder.rglob("*.nii.gz"):
            assert path.read_bytes() == (download / path.relative_to(tmp_path / "again")
                                         ).read_bytes(), path
    assert (tmp_path / "again" / "meta.csv").read_text() == (download / "meta.csv").read_text()
    first = download / "s0001" / "ct.nii.gz"
    assert (other[0] / "ct.nii.gz").read_bytes() != first.read_bytes()


def test_check_and_prepare_accept_it(download: Path, tmp_path: Path, capsys) -> None:
    assert main(["check", str(download), "--version", "v2"]) == 0
    assert f"{N} subject(s)" in capsys.readouterr().out
    assert main(["prepare", str(download), "--version", "v2", "--out", str(tmp_path / "p"),
                 "--workers", "1"]) == 0
    names = label_names("v2")
    for folder in _subjects(download):
        label = _array(tmp_path / "p" / "v2" / f"{folder.name}.nii.gz")
        counts = np.bincount(label.ravel(), minlength=len(names))
        for index in (names.index("liver"), names.index("aorta"), names.index("brain")):
            mask = _array(folder / "segmentations" / f"{names[index]}.nii.gz")
            assert counts[index] == mask.sum(), (folder.name, names[index])


@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "wholebody", "--shape", "16", "16", "16"], "--shape: not with --size wholebody"),
    (["--size", "wholebody", "--layout", "nnunet"], "--layout nnunet: not with --size wholebody"),
    (["--size", "wholebody", "--scale", "0"], "scale must be a number in (0, 1]"),
    (["--scale", "0.5"], "--scale: only with --size wholebody"),
])
def test_options_that_do_not_fit_are_one_error_line(tmp_path: Path, capsys, argv: list[str],
                                                    message: str) -> None:
    out = tmp_path / "out"
    assert main(["phantoms", str(out), "--n", "1", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert not out.exists()
