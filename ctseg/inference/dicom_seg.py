"""DICOM Segmentation (SEG) output of `predict.py` for DICOM series inputs: one binary segment per
predicted structure, named and coloured as in the Slicer/ITK-SNAP tables, referencing the source
series; and the reader that turns such a SEG back into the label map."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ctseg import __version__
from ctseg.atomic import write_atomic
from ctseg.colours import label_colours
from ctseg.errors import DatasetError, blamed_on
from ctseg.inference.inputs import pick_series
from ctseg.labels import Names, label_map_dtype, label_table

log = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"
# NIfTI/MONAI (RAS) to DICOM (LPS) world coordinates, and back (the same flip).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Largest distance, in voxels, between a source pixel's position and its label map voxel.
VOXEL_TOLERANCE = 0.2
# Generic codes: the structure itself is named by SegmentLabel (no per-structure SNOMED codes).
CATEGORY = codes.SCT.AnatomicalStructure
PROPERTY_TYPE = codes.SCT.AnatomicalStructure
ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="ctseg", family=codes.cid7162.ArtificialIntelligence, version=__version__)
# Type 2 attributes (Patient and General Study modules) that highdicom reads from the first source
# instance without a default; those an anonymiser removed are written empty.
COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                "StudyID", "StudyDate", "StudyTime")
# UIDs shared by the whole series that an anonymiser may blank or remove: generated once for it.
SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# The SEG series follows its source series in a viewer's series list.
SERIES_NUMBER_OFFSET = 1000


def series_datasets(folder: Path, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """Headers (no pixel data: the SEG needs geometry and UIDs only) of the CT series that
    `predict.py` reads from `folder`."""
    sources = []
    for path in pick_series(folder, series_uid).files:
        try:
            sources.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as err:
            raise DatasetError(path, f"corrupt DICOM file ({err})") from err
    return sources


def origin(ds: pydicom.Dataset) -> str:
    """The file `ds` was read from, or its SOPInstanceUID when it was not read from a file."""
    return str(ds.get("filename") or ds.get("SOPInstanceUID") or "<DICOM data set without a file "
               "or SOPInstanceUID>")


def series_origin(ds: pydicom.Dataset) -> str:
    """The folder of the file `ds` (an instance of the series) was read from, or `origin(ds)`."""
    filename = ds.get("filename")
    return str(Path(filename).parent) if filename else origin(ds)


def sources_by_slice(sources: Sequence[pydicom.Dataset], affine: np.ndarray,
                     shape: Sequence[int]) -> list[pydicom.Dataset]:
    """The source instance of each slice along the third axis of a label map of `shape` with the
    RAS `affine` of the loaded series (axes: DICOM columns, rows, slices), matched by
    ImagePositionPatient/ImageOrientationPatient; DatasetError when they do not tile the grid."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    by_slice: dict[int, pydicom.Dataset] = {}
    for ds in sources:
        name = origin(ds)
        if (int(ds.Columns), int(ds.Rows)) != tuple(shape[:2]):
            raise DatasetError(name, f"{ds.Columns} x {ds.Rows} pixels but the label map has "
                                     f"{shape[0]} x {shape[1]}; the series mixes image sizes")
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(s) for s in ds.PixelSpacing)
        # pixel (row 0, column 0), the last column of row 0, the last row of column 0
        steps = np.array([[0, 0], [shape[0] - 1, 0], [0, shape[1] - 1]], dtype=np.float64)
        lps = (position + steps[:, :1] * column_spacing * orientation[:3]
               + steps[:, 1:] * row_spacing * orientation[3:])
        voxels = (inverse[:3, :3] @ (RAS_TO_LPS @ lps.T) + inverse[:3, 3:]).T
        index = round(float(voxels[0, 2]))
        expected = np.column_stack([steps, np.full(3, index)])
        if np.abs(voxels - expected).max() > VOXEL_TOLERANCE or not 0 <= index < shape[2]:
            raise DatasetError(name, "ImagePositionPatient/ImageOrientationPatient do not fall on "
                                     "a slice of the loaded volume (irregular slice spacing or "
                                     "mixed orientations), so no DICOM SEG can reference the "
                                     "series; resample it to a regular grid or set "
                                     "dicom_seg=false")
        if index in by_slice:
            raise DatasetError(name, f"same slice position as {origin(by_slice[index])}; "
                                     "remove the duplicate instance")
        by_slice[index] = ds
    if len(by_slice) != shape[2]:
        raise DatasetError(origin(sources[0]),
                           f"{len(by_slice)} source instances for {shape[2]} label map slices; "
                           "the series is incomplete")
    return [by_slice[k] for k in range(shape[2])]


def with_values(ds: pydicom.Dataset, values: dict[str, str | float | None]) -> pydicom.Dataset:
    """`ds` itself when `values` is empty, else a copy of it with `values` set (a copy.copy of a
    pydicom Dataset shares its elements, so setting one would change `ds` too)."""
    if not values:
        return ds
    ds = copy.deepcopy(ds)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def with_type2(ds: pydicom.Dataset, slice_spacing: float) -> tuple[pydicom.Dataset, list[str]]:
    """`ds` (the source instance highdicom copies from) with the COPIED_TYPE2 attributes it lacks
    present and empty, and a missing or empty SliceThickness (Type 2, but without one highdicom
    writes a SEG it cannot read back) set to `slice_spacing`; and a note when it was."""
    values: dict[str, str | float | None] = {
        keyword: None for keyword in COPIED_TYPE2 if keyword not in ds}
    notes = []
    if not ds.get("SliceThickness"):
        values["SliceThickness"] = slice_spacing
        notes.append(f"took the SliceThickness from the slice spacing ({slice_spacing} mm)")
    return with_values(ds, values), notes


def derived_uid(keyword: str, files: Sequence[str | None]) -> str:
    """A UID for `keyword` derived from the source `files` (the same on a rerun over the same
    files); random when a source was not read from a file."""
    if None in files:
        return generate_uid()
    return generate_uid(entropy_srcs=[keyword, *files])


def sop_class(ds: pydicom.Dataset) -> str:
    """The SOPClassUID of `ds`, or when it is blank or missing the MediaStorageSOPClassUID of its
    file meta; DatasetError when neither has one."""
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    if not uid:
        raise DatasetError(origin(ds), "no SOPClassUID, neither in the data set nor in the file "
                                       "meta (MediaStorageSOPClassUID), so no DICOM SEG can "
                                       "reference it; set dicom_seg=false")
    return str(uid)


def with_uids(sources: Sequence[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], list[str]]:
    """`sources` with blank or missing UIDs filled in, as an anonymiser leaves them: SOPClassUID
    from the file meta, SOPInstanceUID per instance and the SERIES_UIDS once for the series,
    derived from the file paths (so the SEG written and the one read back on a rerun name the
    same instances); and notes on what was filled in, for the log."""
    files = [str(Path(f).resolve()) if (f := ds.get("filename")) else None for ds in sources]
    series = {keyword: derived_uid(keyword, files) for keyword in SERIES_UIDS
              if any(not ds.get(keyword) for ds in sources)}
    completed, instances, classes = [], 0, []
    for ds, file in zip(sources, files, strict=True):
        values: dict[str, str | float | None] = {
            keyword: uid for keyword, uid in series.items() if not ds.get(keyword)}
        if not ds.get("SOPInstanceUID"):
            values["SOPInstanceUID"] = derived_uid("SOPInstanceUID", [file])
            instances += 1
        if not ds.get("SOPClassUID"):
            classes.append(sop_class(ds))
            values["SOPClassUID"] = classes[-1]
        completed.append(with_values(ds, values))
    generated = [f"{keyword} {uid}" for keyword, uid in series.items()]
    if instances:
        generated.append(f"the SOPInstanceUIDs of {instances} instance(s)")
    notes = [f"generated {', '.join(generated)}"] if generated else []
    if classes:
        notes.append(f"took the SOPClassUID of {len(classes)} instance(s) from the file meta "
                     f"({', '.join(sorted(set(classes)))})")
    return completed, notes


def segment_descriptions(values: Sequence[int], names: Names) -> list[hd.seg.SegmentDescription]:
    """One description per label value (segment numbers 1, 2, ...): name and table colour."""
    table = label_table(names)
    colours = label_colours(table)
    return [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=table[value],
            segmented_property_category=CATEGORY, segmented_property_type=PROPERTY_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ALGORITHM,
            display_color=hd.color.CIELabColor.from_rgb(*colours[value]),
        )
        for number, value in enumerate(values, start=1)
    ]


def write_dicom_seg(path: Path, labels: np.ndarray, affine: np.ndarray,
                    sources: Sequence[pydicom.Dataset], names: Names,
                    model_name: str = "ctseg") -> Path | None:
    """Write `labels` (on the grid of the loaded series, RAS `affine`) as a BINARY DICOM SEG
    referencing `sources`, one segment per structure present, atomically; None (nothing written)
    when no structure is present, as a SEG needs at least one segment."""
    table = label_table(names)
    labels = labels.astype(label_map_dtype(max(table) + 1), copy=False)
    ordered = sources_by_slice(sources, affine, labels.shape)
    present = [int(v) for v in np.unique(labels) if v]
    unknown = [v for v in present if v not in table]
    if unknown:
        raise ValueError(f"label values {unknown} have no name in the label table")
    if not present:
        log.warning("DICOM series %s (%s): no structure predicted; no DICOM SEG written",
                    ordered[0].SeriesInstanceUID, origin(ordered[0]))
        return None
    segment_numbers = np.zeros(max(present) + 1, dtype=label_map_dtype(len(present) + 1))
    segment_numbers[present] = np.arange(1, len(present) + 1)
    # frames: (slices, rows, columns), frame k of source ordered[k]
    frames = segment_numbers[labels.transpose(2, 1, 0)]
    descriptions = segment_descriptions(present, names)
    ordered, notes = with_uids(ordered)
    first, type2_notes = with_type2(ordered[0], round(float(np.linalg.norm(affine[:3, 2])), 4))
    ordered[0] = first
    where = series_origin(first)
    if notes or type2_notes:
        log.warning("DICOM series %s: blank or missing attributes (an anonymised series?); for "
                    "its DICOM SEG ctseg %s", where, "; ".join(notes + type2_notes))
    # highdicom checks and copies the source headers: what it refuses is a problem of the series
    with blamed_on(where, "highdicom cannot build a DICOM SEG of this series"):
        seg = hd.seg.Segmentation(
            source_images=ordered, pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=int(first.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ctseg",
            manufacturer_model_name=model_name, software_versions=__version__,
            # software has no serial number: its version stands in
            device_serial_number=__version__, content_label="CTSEG",
            content_description="ctseg automatic segmentation",
            series_description=f"ctseg {first.get('SeriesDescription', '')}".strip()[:64],
        )
    return write_atomic(path, seg.save_as)


def read_dicom_seg(path: Path, sources: Sequence[pydicom.Dataset], affine: np.ndarray,
                   names: Names) -> np.ndarray:
    """The label map of a DICOM SEG written by `write_dicom_seg`, on the grid of the source
    series loaded with RAS `affine` (the grid of labels.nii.gz), values from `names`."""
    seg = hd.seg.segread(path)
    value_of = {name: value for value, name in label_table(names).items()}
    segments = seg.SegmentSequence
    lookup = np.zeros(len(segments) + 1, dtype=label_map_dtype(max(value_of.values()) + 1))
    for item in segments:
        if item.SegmentLabel not in value_of:
            raise ValueError(f"{path}: segment {item.SegmentLabel!r} is not in the label table")
        lookup[int(item.SegmentNumber)] = value_of[item.SegmentLabel]
    shape = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    ordered, _ = with_uids(sources_by_slice(sources, affine, shape))
    numbers = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in ordered], combine_segments=True)
    return lookup[numbers].transpose(2, 1, 0)
