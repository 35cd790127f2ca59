"""Outputs of `predict.py`: label map, per-structure masks, probabilities, label JSON and colour
tables for 3D Slicer and ITK-SNAP, written into a case folder that appears atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctseg.atomic import write_atomic
from ctseg.colours import label_colours
from ctseg.errors import DatasetError
from ctseg.labels import Names, label_map_dtype, label_table

LABELS_FILE = "labels.nii.gz"
LABELS_JSON = "labels.json"
SLICER_TABLE = "labels_slicer.ctbl"
ITKSNAP_TABLE = "labels_itksnap.txt"
MASKS_DIR = "segmentations"
PROBABILITIES_DIR = "probabilities"
TIMING_FILE = "timing.json"


def file_name(name: str) -> str:
    """A structure name as one word for file names and tables ("right kidney" -> right_kidney)."""
    return "_".join(name.split())


def _coloured(names: Names) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(value, name, colour) per label; the colour is its structure name's (`ctseg.colours`)."""
    table = label_table(names)
    colours = label_colours(table)
    return [(i, n, colours[i]) for i, n in sorted(table.items())]


def label_json(names: Names) -> str:
    """`{"0": "background", "1": "spleen", ...}` as indented JSON text."""
    return json.dumps({str(i): n for i, n in sorted(label_table(names).items())},
                      indent=2) + "\n"


def read_label_json(path: Path, remedy: str) -> dict[int, str]:
    """The label table of a labels.json written by `label_json`; DatasetError naming the file
    and `remedy` when it is not one."""
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise DatasetError(path, f"not a label table {{\"0\": \"background\", ...}} ({err}); "
                           f"{remedy}") from err


def slicer_table(names: Names) -> str:
    """3D Slicer colour table (.ctbl): `index name R G B A` per label."""
    lines = ["# 3D Slicer colour table written by ctseg", f"# {len(label_table(names))} labels"]
    for i, name, (r, g, b) in _coloured(names):
        lines.append(f"{i} {file_name(name)} {r} {g} {b} {0 if i == 0 else 255}")
    return "\n".join(lines) + "\n"


def itksnap_table(names: Names) -> str:
    """ITK-SNAP label description file: index, RGB, alpha, visibility, mesh visibility, name."""
    lines = ["# ITK-SnAP Label Description File written by ctseg",
             "# Columns = Index, Red, Green, Blue, Alpha, Label visibility, Mesh visibility, Label"]
    for i, name, (r, g, b) in _coloured(names):
        shown = 0 if i == 0 else 1
        lines.append(f"{i:5d} {r:5d} {g:4d} {b:4d} {shown:8d} {shown:2d} {shown:2d}    \"{name}\"")
    return "\n".join(lines) + "\n"


def nifti_like(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None
               ) -> nib.Nifti1Image:
    """A NIfTI image of `data` on the input's grid: its affine and (when given) a copy of its
    header, with data type and scaling set for `data`."""
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    img = nib.Nifti1Image(data, affine, hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    return img


def _save(img: nib.Nifti1Image, path: Path) -> None:
    """Write a NIfTI file (inside the temporary case folder, so plain saving is enough)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def write_case(
    folder: Path,
    labels: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    names: Names,
    masks: bool,
    probabilities: Mapping[int, np.ndarray],
) -> None:
    """Write every output of one case into `folder` (which must be empty or new); `names` maps
    label values to structures (a list: class indices)."""
    table = label_table(names)
    labels = labels.astype(label_map_dtype(max(table) + 1), copy=False)
    _save(nifti_like(labels, affine, header), folder / LABELS_FILE)
    (folder / LABELS_JSON).write_text(label_json(names))
    (folder / SLICER_TABLE).write_text(slicer_table(names))
    (folder / ITKSNAP_TABLE).write_text(itksnap_table(names))
    if masks:
        for index, name in table.items():
            if index:
                mask = (labels == index).astype(np.uint8)
                _save(nifti_like(mask, affine, header),
                      folder / MASKS_DIR / f"{file_name(name)}.nii.gz")
    for index, volume in probabilities.items():
        prob = volume.astype(np.float32, copy=False)
        _save(nifti_like(prob, affine, header),
              folder / PROBABILITIES_DIR / f"{file_name(table[index])}.nii.gz")


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
