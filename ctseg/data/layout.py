"""The TotalSegmentator download layout: meta.csv, subject folders, and checks of their files;
which layout a dataset folder has."""

from __future__ import annotations

import csv
import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ctseg.errors import DatasetError, blamed_on
from ctseg.labels import class_names

SPLITS = ("train", "val", "test")
META = "meta.csv"
# The file that makes a folder an nnU-Net raw dataset (ctseg.data.nnunet).
DATASET_JSON = "dataset.json"
# Tolerance for comparing a mask's affine with its CT's (millimetres / direction cosines).
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class Subject:
    """One row of meta.csv: a subject folder `<root>/<image_id>` and its split."""

    image_id: str
    split: str
    root: Path

    @property
    def folder(self) -> Path:
        """The subject's folder."""
        return self.root / self.image_id

    @property
    def ct(self) -> Path:
        """The subject's CT volume."""
        return self.folder / "ct.nii.gz"

    @property
    def masks_folder(self) -> Path:
        """The folder of the subject's masks."""
        return self.folder / "segmentations"

    def mask(self, name: str) -> Path:
        """The binary mask of structure `name`."""
        return self.masks_folder / f"{name}.nii.gz"


def _sniff_delimiter(header: str) -> str:
    """meta.csv is `;`-separated in the download; accept `,` for hand-made files."""
    return ";" if header.count(";") >= header.count(",") else ","


def read_description(path: Path, what_it_is: str) -> str:
    """The text of a dataset's description file (meta.csv, dataset.json); DatasetError naming it
    when it is missing (with `what_it_is`, a question that helps) or unreadable."""
    if not path.is_file():
        raise DatasetError(path, f"{path.name} not found; {what_it_is}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"cannot read {path.name} ({err})") from err


def read_meta(root: str | Path) -> list[Subject]:
    """Parse `<root>/meta.csv` into subjects; raise DatasetError on any problem with it."""
    root = Path(root)
    path = root / META
    text = read_description(path, "is this the root of a TotalSegmentator download (it holds "
                                  "meta.csv and the sXXXX folders)?")
    lines = text.splitlines()
    if not lines:
        raise DatasetError(path, "meta.csv is empty")
    reader = csv.DictReader(lines, delimiter=_sniff_delimiter(lines[0]))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("image_id", "split") if c not in columns]
    if missing:
        raise DatasetError(path, f"meta.csv lacks column(s) {', '.join(missing)} "
                                 f"(found: {', '.join(columns) or 'none'})")
    subjects: list[Subject] = []
    seen: set[str] = set()
    for line_no, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        image_id, split = row["image_id"], row["split"]
        if not image_id:
            raise DatasetError(path, f"line {line_no}: empty image_id")
        if split not in SPLITS:
            raise DatasetError(path, f"line {line_no}: split {split!r} of {image_id} is not one of "
                                     f"{', '.join(SPLITS)}")
        if image_id in seen:
            raise DatasetError(path, f"line {line_no}: image_id {image_id} appears twice")
        seen.add(image_id)
        subjects.append(Subject(image_id, split, root))
    if not subjects:
        raise DatasetError(path, "meta.csv lists no subjects")
    return subjects


def by_split(subjects: Iterable[Subject]) -> dict[str, list[Subject]]:
    """Group subjects by split, every split present (possibly empty)."""
    groups: dict[str, list[Subject]] = {s: [] for s in SPLITS}
    for subject in subjects:
        groups[subject.split].append(subject)
    return groups


def load_nifti(path: str | Path, remedy: str = "re-download it") -> nib.Nifti1Image:
    """Read a 3-D NIfTI file into memory; DatasetError if it is missing, corrupt (with `remedy`)
    or not 3-D."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError,
            nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(path, f"corrupt or truncated NIfTI file ({type(err).__name__}: {err}); "
                                 f"{remedy}") from err
    shape = data.shape
    if len(shape) == 4 and shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(path, f"expected a 3-D volume, found shape {shape}")
    check_affine(img.affine, path)
    return nib.Nifti1Image(data, img.affine, img.header)


def check_affine(affine: np.ndarray, path: Path) -> None:
    """Raise DatasetError unless the voxel-to-world affine is finite and invertible (a header
    with zero or missing voxel sizes cannot be reoriented or resampled)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(affine).all() or abs(np.linalg.det(linear)) < 1e-9:
        sizes = np.round(np.linalg.norm(linear, axis=0), 4).tolist()
        raise DatasetError(path, f"invalid voxel-to-world affine (voxel sizes {sizes} mm); the "
                                 "header's pixdim/qform/sform are broken, fix or re-export it")


def stored_labels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """A label map's values in its stored integer type (uint8 for TotalSegmentator: a whole-body
    CT at native resolution stays ~200 MB, not 800 MB as int32); float-stored maps rounded;
    DatasetError naming `path` if it cannot be read or holds a negative value."""
    with blamed_on(path, "cannot read this label map"):
        data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data).astype(np.int32)
    if data.size and data.min() < 0:
        raise DatasetError(path, f"negative label value {data.min()}; a label map holds class "
                           "indices 0..N-1")
    return data


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """Whether two images share one voxel grid: shape, and affine within AFFINE_ATOL."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=AFFINE_ATOL)


def check_grid(ct: nib.Nifti1Image, mask: nib.Nifti1Image, mask_path: Path) -> None:
    """Raise DatasetError if `mask` is not on the CT's voxel grid (shape and affine)."""
    if mask.shape != ct.shape:
        raise DatasetError(mask_path, f"mask shape {mask.shape} differs from the CT's {ct.shape}")
    if not same_grid(ct, mask):
        raise DatasetError(
            mask_path, "mask affine differs from the CT's (different voxel grid):\n"
            f"mask\n{np.round(mask.affine, 4)}\nct\n{np.round(ct.affine, 4)}")


def is_binary(data: np.ndarray) -> bool:
    """Whether every value of `data` is 0 or 1, in one pass without sorting: an integer array's
    values lie in {0, 1} exactly when its minimum is >= 0 and its maximum <= 1 (and an unsigned
    one's minimum always is); a float one's when each equals 0 or 1 (NaN equals neither)."""
    if data.size == 0 or data.dtype == np.bool_:
        return True
    if np.issubdtype(data.dtype, np.unsignedinteger):
        return bool(data.max() <= 1)
    if np.issubdtype(data.dtype, np.integer):
        return bool(data.min() >= 0 and data.max() <= 1)
    return bool(np.logical_or(data == 0, data == 1).all())


def check_binary(data: np.ndarray, mask_path: Path) -> None:
    """Raise DatasetError unless the mask holds only 0 and 1 (naming the values it holds)."""
    if is_binary(data):
        return
    values = np.unique(data)
    shown = ", ".join(f"{v:g}" for v in values[:8])
    raise DatasetError(mask_path, f"mask is not binary; values found: {shown}"
                                  f"{' ...' if len(values) > 8 else ''}")


def subject_problems(subject: Subject, version: str) -> list[str]:
    """Every problem with one subject's CT and masks for `version`, as 'path: problem' lines."""
    problems: list[str] = []
    try:
        ct = load_nifti(subject.ct)
    except DatasetError as err:
        return [str(err)]
    for name in class_names(version).values():
        path = subject.mask(name)
        try:
            mask = load_nifti(path)
            check_grid(ct, mask, path)
            check_binary(np.asanyarray(mask.dataobj), path)
        except DatasetError as err:
            problem = err.problem
            if problem == "file not found":
                problem = f"mask of {name} missing (required by TotalSegmentator {version})"
            problems.append(f"{err.path}: {problem}")
    return problems


def detect_layout(root: str | Path) -> str:
    """The layout of a dataset folder by its files: `nnunet` (dataset.json) or `totalseg`
    (meta.csv); DatasetError naming the folder when it has neither."""
    root = Path(root)
    if (root / DATASET_JSON).is_file():
        return "nnunet"
    if (root / META).is_file():
        return "totalseg"
    what = "folder not found" if not root.is_dir() else "neither dataset.json nor meta.csv here"
    raise DatasetError(root, f"{what}; a dataset root is a TotalSegmentator download (meta.csv "
                             "and the sXXXX folders) or an nnU-Net raw dataset (dataset.json, "
                             "imagesTr, labelsTr)")
