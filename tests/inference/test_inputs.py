"""Reading predict.py's inputs: every truncated or corrupted NIfTI or DICOM file is one
DatasetError naming it, whatever nibabel, pydicom or MONAI raise for it; running out of memory
while reading an input or a checkpoint is not reported as a bad file."""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers import raised_short_of_memory, write_dicom_series

from ctseg.errors import DatasetError
from ctseg.inference.inputs import Case, load_case


def corrupted(data: bytes, flipped: range, cuts: int = 12) -> Iterator[bytes]:
    """`data` cut at `cuts` evenly spaced lengths (an interrupted copy), then with each byte at
    the positions `flipped` inverted, one at a time (a damaged disk or transfer)."""
    for cut in np.linspace(0, len(data) - 1, cuts).astype(int):
        yield data[:cut]
    for i in flipped:
        yield data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def causes_of_failures(case: Case, path: Path, variants: Iterator[bytes]) -> Counter[str]:
    """Write each variant to `path` and load `case`: each failure must be a DatasetError naming
    the case's path or the damaged file; the types of what caused them, counted."""
    causes: Counter[str] = Counter()
    for data in variants:
        path.write_bytes(data)
        try:
            load_case(case)
        except DatasetError as err:
            assert str(err).startswith((f"{case.path}: ", f"{path}: ")), err
            causes[type(err.__cause__).__name__ if err.__cause__ else "checked"] += 1
    return causes


@pytest.fixture(scope="module")
def small_ct(shared_ct: Path) -> nib.Nifti1Image:
    """A 24 x 24 x 8 corner of the shared crop, with its header."""
    img = nib.load(shared_ct)
    return nib.Nifti1Image(np.asanyarray(img.dataobj)[:24, :24, :8], img.affine, img.header)


def test_every_truncated_or_corrupted_nifti_is_one_error_naming_it(small_ct, tmp_path):
    raw = small_ct.to_bytes()
    packed = gzip.compress(raw, mtime=0)
    causes = Counter()
    # every second byte of the 348-byte header; 24 bytes across the compressed stream
    for name, variants in (("ct.nii", corrupted(raw, range(0, 348, 2))),
                           ("ct.nii.gz", corrupted(packed, range(10, len(packed),
                                                                 len(packed) // 24)))):
        path = tmp_path / name
        causes += causes_of_failures(Case("ct", path, "nifti"), path, variants)
    # header, gzip, zlib and voxel-count failures all met, and each became a DatasetError
    assert {"ImageFileError", "HeaderDataError", "OSError", "EOFError", "error",
            "BadGzipFile"} <= set(causes), causes


@pytest.fixture
def series(small_ct: nib.Nifti1Image, tmp_path: Path) -> Path:
    """A three-slice DICOM series with fixed UIDs (the same bytes in every run)."""

    def fixed_uids(k: int, ds: pydicom.Dataset) -> None:
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3.1", "1.2.3.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.4.{k}"

    write_dicom_series(nib.Nifti1Image(np.asanyarray(small_ct.dataobj)[:16, :16, :3],
                                       small_ct.affine), tmp_path / "series", series_uid="1.2.3",
                       edit=fixed_uids)
    return tmp_path / "series"


def test_truncated_or_corrupted_dicom_files_are_one_error_naming_them(series):
    damaged = sorted(series.iterdir())[1]
    causes = causes_of_failures(Case("series", series, "dicom"), damaged,
                                corrupted(damaged.read_bytes(), range(128, 1100, 5)))
    # pydicom's header errors and MONAI's reader failing on damaged values, each a DatasetError
    assert {"BytesLengthException", "NotImplementedError", "ValueError", "TypeError",
            "UFuncTypeError"} <= set(causes), causes


def test_a_damaged_series_uid_is_one_error_naming_the_file(series):
    damaged = sorted(series.iterdir())[1]
    data = damaged.read_bytes()
    # (0020,000E) SeriesInstanceUID with its value representation UI damaged to U\xb6
    vr = data.index(b"\x20\x00\x0e\x00UI") + 5
    damaged.write_bytes(data[:vr] + b"\xb6" + data[vr + 1:])
    with pytest.raises(DatasetError, match=str(damaged)):
        load_case(Case("series", series, "dicom"))


def test_running_out_of_memory_is_not_called_a_corrupt_input_or_checkpoint(tmp_path):
    nifti = tmp_path / "big.nii.gz"  # 128 MiB of voxels in 0.6 MB
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 128), np.float32), np.eye(4)), nifti)
    checkpoint = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(64, 1024, 256)}, checkpoint)  # 64 MiB
    raised = raised_short_of_memory(
        "from ctseg.inference.inputs import Case, load_case\n"
        "from ctseg.models.weights import read_checkpoint",
        [f"load_case(Case('big', Path('{nifti}'), 'nifti'))",
         f"read_checkpoint(Path('{checkpoint}'), mmap=True)",  # predict.py's checkpoints
         f"read_checkpoint(Path('{checkpoint}'), mmap=False)"])  # pretrained weights
    checkpoint.unlink()
    assert raised[0].startswith("MemoryError"), raised
    for line in raised[1:]:  # PyTorch's allocator or memory map, not a CheckpointError
        assert line.startswith("RuntimeError") and "Cannot allocate memory" in line, raised
