"""Fixtures of the prediction tests: a tiny checkpoint and CT inputs made from the shared crop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctseg.labels import label_names
from ctseg.models.segresnet import SegResNetModule

# Small model grid (4 mm) and window so each prediction takes about a second on CPU.
SPACING, ROI = 4.0, (32, 32, 32)
# NIfTI (RAS) to DICOM (LPS) world coordinates.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def tiny_module(num_classes: int = 105, seed: int = 0) -> SegResNetModule:
    """A random-weight SegResNetModule with 8 initial filters (v1 names for 105 classes)."""
    torch.manual_seed(seed)
    names = label_names("v1") if num_classes == 105 else None
    return SegResNetModule(num_classes=num_classes, label_names=names, init_filters=8,
                           roi_size=ROI)


def save_checkpoint(module: SegResNetModule, path: Path, version: str = "v1") -> Path:
    """Write a Lightning-style checkpoint: state dict, module and datamodule hyper-parameters."""
    torch.save({
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"version": version, "spacing": SPACING,
                                        "intensity": "segresnet", "patch_size": list(ROI)},
    }, path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a 105-class tiny checkpoint (4 mm, 32^3 windows)."""
    return save_checkpoint(tiny_module(), tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="session")
def shared_ct(shared_data: Path) -> Path:
    """The shared real CT crop (RAS, 3 mm, int16)."""
    return shared_data / "s0001" / "ct.nii.gz"


def write_dicom_series(img: nib.Nifti1Image, folder: Path, modality: str = "CT",
                       description: str = "ctseg test", series_uid: str | None = None,
                       edit: Callable[[int, pydicom.Dataset], None] | None = None) -> str:
    """Write a NIfTI volume as one DICOM series (one slice per file along the third axis);
    `edit(k, ds)` changes the instance of slice k before it is saved."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asanyarray(img.dataobj).astype(np.int16)
    affine = img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = RAS_TO_LPS @ affine[:3, 0] / spacing[0]  # along DICOM columns = NIfTI axis 0
    col_dir = RAS_TO_LPS @ affine[:3, 1] / spacing[1]  # along DICOM rows = NIfTI axis 1
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesDescription = modality, description
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID, ds.PatientID = frame_uid, "ctseg-test"
        ds.InstanceNumber = k + 1
        position = RAS_TO_LPS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        if edit is not None:
            edit(k, ds)
        ds.save_as(folder / f"slice_{series_uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return series_uid
