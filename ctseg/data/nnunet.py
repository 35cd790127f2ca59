"""The nnU-Net v2 raw layout (and the Medical Segmentation Decathlon's): `dataset.json`,
`imagesTr/<case>_0000.nii.gz` (or `<case>.nii.gz`), `labelsTr/<case>.nii.gz`, optional
`imagesTs` with `labelsTs`; its label maps rewritten onto a `LabelSpace` by structure name."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctseg.atomic import save_nifti_atomic
from ctseg.data.file_stamp import file_stamp
from ctseg.data.layout import (
    DATASET_JSON,
    check_grid,
    load_nifti,
    read_description,
    stored_labels,
)
from ctseg.data.merge import (
    MERGE_FORMAT,
    LabelJob,
    PreparedDataset,
    default_prepared_dir,
    run_label_jobs,
)
from ctseg.errors import DatasetError, blamed_on
from ctseg.label_space import LabelSpace
from ctseg.labels import label_map_dtype

log = logging.getLogger(__name__)

DEFAULT_ENDING = ".nii.gz"


@dataclass(frozen=True)
class NnunetDataset:
    """What dataset.json says: label name -> value in the label maps, and the file ending."""

    root: Path
    labels: dict[str, int]
    file_ending: str


@dataclass(frozen=True)
class Case:
    """One labelled case: its CT, label map and split (train from imagesTr, test from imagesTs)."""

    case_id: str
    split: str
    image: Path
    label: Path


def read_dataset_json(root: str | Path) -> NnunetDataset:
    """Parse `<root>/dataset.json` (nnU-Net v2's `{name: value}` labels or the Decathlon's
    `{"value": name}`); DatasetError naming the file on any problem."""
    root = Path(root)
    path = root / DATASET_JSON
    text = read_description(path, "is this the root of an nnU-Net raw dataset (dataset.json, "
                                  "imagesTr, labelsTr)?")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise DatasetError(path, f"cannot read dataset.json ({err})") from err
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(path, 'dataset.json has no "labels" mapping (name: value)')
    channels = data.get("channel_names", data.get("modality", {"0": "CT"}))
    if len(channels) != 1:
        raise DatasetError(path, f"dataset.json lists {len(channels)} input channels "
                                 f"({', '.join(map(str, channels.values()))}); ctseg segments "
                                 "one CT channel")
    labels: dict[str, int] = {}
    for key, value in raw.items():
        name, number = (value, key) if str(key).isdigit() else (key, value)
        if isinstance(number, list):
            raise DatasetError(path, f"label {name!r} is a region (a list of values); ctseg "
                                     "reads one value per label")
        try:
            labels[str(name)] = int(number)
        except (TypeError, ValueError):
            raise DatasetError(path, f"label {name!r} has value {number!r}, not an integer"
                               ) from None
    return NnunetDataset(root, labels, str(data.get("file_ending", DEFAULT_ENDING)))


def _image_of(folder: Path, case_id: str, ending: str) -> Path | None:
    """The CT of a case: `<case>_0000<ending>` (nnU-Net) or `<case><ending>` (Decathlon)."""
    for name in (f"{case_id}_0000{ending}", f"{case_id}{ending}"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_cases(dataset: NnunetDataset) -> list[Case]:
    """The labelled cases, sorted by id: every label map of labelsTr (split train) and of
    labelsTs (split test), each with its CT; DatasetError naming a label map without CT."""
    root, ending = dataset.root, dataset.file_ending
    if not (root / "labelsTr").is_dir():
        raise DatasetError(root / "labelsTr", "folder not found; an nnU-Net raw dataset holds "
                                              "its label maps in labelsTr")
    cases: list[Case] = []
    for split, images, labels in (("train", "imagesTr", "labelsTr"),
                                  ("test", "imagesTs", "labelsTs")):
        for label in sorted((root / labels).glob(f"*{ending}")):
            if label.name.startswith("."):
                continue
            case_id = label.name[:-len(ending)]
            image = _image_of(root / images, case_id, ending)
            if image is None:
                raise DatasetError(label, f"no CT for this label map: expected {images}/"
                                          f"{case_id}_0000{ending}")
            cases.append(Case(case_id, split, image, label))
    if not any(c.split == "train" for c in cases):
        raise DatasetError(root / "labelsTr", f"no *{ending} label map found")
    return cases


def remap_case(mapping: dict[int, int], num_classes: int, case: Case, out: Path) -> list[int]:
    """Write the case's label map with its values replaced by label-space channels to `out`;
    voxels per channel. DatasetError for a value dataset.json does not list."""
    with blamed_on(case.image, "cannot read this CT's header"):
        ct = nib.load(case.image)
    img = load_nifti(case.label)
    check_grid(ct, img, case.label)
    values = stored_labels(img, case.label)
    unknown = sorted(set(np.unique(values).tolist()) - set(mapping) - {0})
    if unknown:
        raise DatasetError(case.label, f"label value {unknown[0]} is not in dataset.json's labels"
                                       f" (values {sorted({0, *mapping})})")
    lut = np.zeros(int(values.max(initial=0)) + 1, dtype=label_map_dtype(num_classes))
    for value, channel in mapping.items():
        if value < lut.size:
            lut[value] = channel
    label = lut[values]
    out_img = nib.Nifti1Image(label, ct.affine, ct.header)
    out_img.set_data_dtype(label.dtype)
    out_img.header.set_slope_inter(1, 0)
    out_img.header["descrip"] = b"ctseg label map (nnU-Net layout, remapped)"
    save_nifti_atomic(out_img, out)
    return np.bincount(label.ravel(), minlength=num_classes).tolist()


def prepare_nnunet(root: str | Path, space: LabelSpace, name: str,
                   rename: dict[str, str] | None = None, out: str | Path | None = None,
                   workers: int = 1, progress: bool = False) -> PreparedDataset:
    """Rewrite the label maps of an nnU-Net raw dataset onto `space` into
    `<out>/<mapping hash>/` (a no-op when done); records with the channels it annotates."""
    root = Path(root).resolve()
    dataset = read_dataset_json(root)
    mapping = space.mapping(dataset.labels, name, rename)
    cases = read_cases(dataset)
    out = Path(out).resolve() if out is not None else default_prepared_dir(root)
    settings = {"format": MERGE_FORMAT, "names": space.names,
                "mapping": sorted(mapping.items())}
    folder = out / f"mapped-{file_stamp({}, header=(json.dumps(settings),))[:12]}"
    jobs = [LabelJob(c.case_id, file_stamp({"image": c.image, "label": c.label},
                                           header=(json.dumps(settings),)),
                     Path(), c.label, partial(remap_case, mapping, space.num_classes, c))
            for c in cases]
    labels = run_label_jobs(root, folder, jobs, workers, progress)
    annotated = space.annotated(sorted(set(mapping.values())))
    records: list[dict[str, Any]] = [
        {"image_id": c.case_id, "split": c.split, "image": str(c.image),
         "label": str(labels[c.case_id][0]), "voxels": labels[c.case_id][1],
         "annotated": annotated} for c in cases]
    log.info("%s: %d cases (nnU-Net layout), labels %s", name, len(cases),
             ", ".join(f"{k}->{space.names[v]}" for k, v in sorted(mapping.items())))
    return PreparedDataset(root=root, version=space.version, out_dir=out, records=records)


def case_problems(case: Case, dataset: NnunetDataset) -> list[str]:
    """Every problem of one case (its CT and label map readable, on one grid, values listed in
    dataset.json), as 'path: problem' lines."""
    try:
        ct = load_nifti(case.image)
        label = load_nifti(case.label)
        check_grid(ct, label, case.label)
        values = set(np.unique(stored_labels(label, case.label)).tolist())
    except DatasetError as err:
        return [str(err)]
    unknown = sorted(values - set(dataset.labels.values()) - {0})
    return [f"{case.label}: label value {unknown[0]} is not in dataset.json's labels"] \
        if unknown else []
