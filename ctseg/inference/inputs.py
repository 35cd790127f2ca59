"""Inputs of `predict.py`: find the cases (NIfTI files, DICOM series folders) and load one as a
MONAI MetaTensor, with one clear error naming the file for each kind of bad input."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.data import MetaTensor
from monai.transforms import LoadImage
from monai.utils import MetaKeys

from ctseg.atomic import scratch_folder
from ctseg.data.layout import check_affine
from ctseg.errors import DatasetError, data_errors, dicom_errors, out_of_memory

log = logging.getLogger(__name__)

# The CT of a subject folder in the TotalSegmentator layout.
SUBJECT_CT = "ct.nii.gz"

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CT_MODALITY = "CT"


@dataclass(frozen=True)
class Case:
    """One input volume: a NIfTI file or a folder holding one DICOM series (`kind` says which)."""

    name: str
    path: Path
    kind: str


@dataclass(frozen=True)
class DicomSeries:
    """The files of one DICOM series in a folder, with the tags shown when the user must pick."""

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]


def is_nifti(path: Path) -> bool:
    """True for a file name ending in .nii or .nii.gz."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def case_name(path: Path) -> str:
    """Output name of an input: the file name without .nii(.gz), or the DICOM folder's name."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dicom_files(folder: Path) -> list[Path]:
    """DICOM files directly inside `folder` (by their DICM preamble)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and pydicom.misc.is_dicom(p))


def discover_cases(source: str | Path) -> list[Case]:
    """Cases of `source`: a NIfTI file, a DICOM series folder, or a folder of NIfTI files, DICOM
    series sub-folders and/or subject sub-folders with a `ct.nii.gz` (named after the sub-folder);
    DatasetError when it is missing or holds nothing readable."""
    source = Path(source)
    if not source.exists():
        raise DatasetError(source, "input not found")
    if source.is_file():
        if is_nifti(source):
            return [Case(case_name(source), source, "nifti")]
        if pydicom.misc.is_dicom(source):
            raise DatasetError(source, "a single DICOM file; pass the folder holding its series")
        raise DatasetError(source, "not a NIfTI file (.nii/.nii.gz) nor a DICOM series folder")
    if _dicom_files(source):
        return [Case(source.name, source, "dicom")]
    cases = [Case(case_name(p), p, "nifti") for p in sorted(source.iterdir())
             if p.is_file() and is_nifti(p)]
    cases += [Case(p.name, p, "dicom") for p in sorted(source.iterdir())
              if p.is_dir() and _dicom_files(p)]
    # a TotalSegmentator-style root: one sub-folder per subject holding ct.nii.gz
    cases += [Case(p.name, p / SUBJECT_CT, "nifti") for p in sorted(source.iterdir())
              if p.is_dir() and (p / SUBJECT_CT).is_file()]
    if not cases:
        raise DatasetError(source, "empty input folder: no NIfTI files (.nii/.nii.gz), no DICOM "
                                   "files and no sub-folders with DICOM series")
    names = [c.name for c in cases]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise DatasetError(source, f"several inputs would write the same output name: "
                                   f"{', '.join(clashes)}; rename them")
    return cases


def dicom_series(folder: Path) -> list[DicomSeries]:
    """The DICOM series in `folder`, grouped by SeriesInstanceUID (headers only are read)."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.get("SeriesInstanceUID", ""))  # decoded here: a damaged tag fails now
        except dicom_errors() as err:
            if out_of_memory(err):
                raise
            raise DatasetError(path, f"corrupt DICOM file ({err})") from err
        groups[uid].append((path, ds))
    series = []
    for uid, items in groups.items():
        first = items[0][1]
        series.append(DicomSeries(uid, str(first.get("SeriesDescription", "")),
                                  str(first.get("Modality", "")),
                                  tuple(p for p, _ in items)))
    return sorted(series, key=lambda s: s.uid)


def pick_series(folder: Path, series_uid: str | None = None) -> DicomSeries:
    """The one CT series of `folder` (or the one with `series_uid`); DatasetError listing the
    series when there are several, or when the chosen one is not CT."""
    series = dicom_series(folder)
    if not series:
        raise DatasetError(folder, "no DICOM files in this folder")
    listing = "\n".join(f"  {s.uid}  {s.description or '(no description)'}  {s.modality}  "
                        f"{len(s.files)} files" for s in series)
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise DatasetError(folder, f"no DICOM series with SeriesInstanceUID {series_uid}; "
                                       f"the folder holds:\n{listing}")
    elif len(series) > 1:
        raise DatasetError(folder, f"{len(series)} DICOM series in one folder; pick one with "
                                   f"series_uid=<SeriesInstanceUID>:\n{listing}")
    else:
        chosen = series
    pick = chosen[0]
    if pick.modality != CT_MODALITY:
        raise DatasetError(folder, f"DICOM series {pick.uid} has modality {pick.modality or '?'}, "
                                   "not CT; the model segments CT only")
    return pick


def _check_shape(path: Path, shape: tuple[int, ...]) -> None:
    """Raise DatasetError unless `shape` is 3-D (or 4-D holding a single volume)."""
    if len(shape) == 4 and shape[3] == 1:
        return
    if len(shape) != 3:
        extra = " (a time series or multi-channel image: split it into 3-D volumes)" if (
            len(shape) == 4) else ""
        raise DatasetError(path, f"expected a 3-D CT volume, found shape {shape}{extra}")
    if min(shape) < 2:
        raise DatasetError(path, f"expected a 3-D CT volume, found shape {shape} (a 2-D slice)")


def _load_nifti(path: Path) -> tuple[MetaTensor, nib.Nifti1Header]:
    """The NIfTI volume as a (X, Y, Z) float32 MetaTensor, and its header."""
    try:
        header = nib.load(path).header
    except data_errors() as err:
        if out_of_memory(err):
            raise
        raise DatasetError(path, f"corrupt or unreadable NIfTI file ({type(err).__name__}: "
                                 f"{err})") from err
    _check_shape(path, tuple(int(s) for s in header.get_data_shape()))
    check_affine(header.get_best_affine(), path)
    try:
        image = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
    except data_errors() as err:
        if out_of_memory(err):
            raise
        raise DatasetError(path, f"corrupt or truncated NIfTI file ({type(err).__name__}: "
                                 f"{err})") from err
    if image.ndim == 4:  # a single volume stored as 4-D: drop the time axis
        image = image[..., 0]
        image.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
        image.meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.shape)
    return image, header.copy()


def _read_series(loader: LoadImage, path: Path, folder: Path, uid: str) -> MetaTensor:
    """The DICOM files in `path` read by `loader`; a DatasetError naming `folder` for what a
    corrupt series raises (running out of memory is not a corrupt file)."""
    try:
        return loader(str(path))
    except dicom_errors() as err:
        if out_of_memory(err):
            raise
        raise DatasetError(folder, f"cannot read DICOM series {uid} "
                                   f"({type(err).__name__}: {err})") from err


def _load_dicom(folder: Path, series_uid: str | None) -> MetaTensor:
    """The chosen CT series of `folder` as a (X, Y, Z) float32 MetaTensor with a RAS affine."""
    series = pick_series(folder, series_uid)
    loader = LoadImage(reader="PydicomReader", image_only=True, dtype=np.float32)
    if len(series.files) == len(_dicom_files(folder)):
        image = _read_series(loader, folder, folder, series.uid)
    else:
        with scratch_folder("dicom_series") as tmp:
            for path in series.files:
                (tmp / path.name).symlink_to(path.resolve())
            image = _read_series(loader, tmp, folder, series.uid)
    _check_shape(folder, tuple(image.shape))
    return image


def load_case(
    case: Case, series_uid: str | None = None
) -> tuple[MetaTensor, nib.Nifti1Header | None]:
    """Load a case as a (X, Y, Z) float32 MetaTensor, plus the NIfTI header to copy on output
    (None for DICOM)."""
    if case.kind == "nifti":
        return _load_nifti(case.path)
    return _load_dicom(case.path, series_uid), None
