"""Training records and the datasets they come from: a record's keys, the checked data.datasets
entries, and a dataset over records whose failures name the subject's files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import Dataset
from torch.utils.data import Dataset as TorchDataset

from ctseg.config import plain
from ctseg.data.phantoms import LAYOUTS
from ctseg.data.transforms import ANNOTATED, DATASET, IMAGE, LABEL
from ctseg.errors import ConfigError, blamed_on

# Record key holding the subject id. Not "image_id": MONAI treats keys starting with "image_" as
# the image's metadata dictionary.
SUBJECT = "subject"
# Keys of a data.datasets entry: required, optional.
DATASET_KEYS = ("name", "root")
DATASET_OPTIONS = ("layout", "rename", "masks", "phantoms")
# Keys of a data.datasets entry's `phantoms` (synthetic phantoms written into its root).
PHANTOM_OPTIONS = ("n", "seed", "shape", "spacing", "structures")


def make_record(prepared: Mapping[str, Any], dataset: str,
                annotated: list[bool] | None) -> dict[str, Any]:
    """The training record of one prepared subject (`PreparedDataset.records`' image, label and
    image_id) of `dataset`, with its per-class `annotated` flags when some record is partial."""
    record = {IMAGE: prepared["image"], LABEL: prepared["label"], SUBJECT: prepared["image_id"],
              DATASET: dataset}
    if annotated is not None:
        record[ANNOTATED] = torch.tensor(annotated)
    return record


def check_datasets(datasets: Sequence[Mapping[str, Any]], main_names: Sequence[str]
                   ) -> list[dict[str, Any]]:
    """The data.datasets entries as plain dicts, checked: each with a unique `name` and a
    `root`, an optional `layout` (totalseg or nnunet; default: recognised by its files), an
    optional `rename` (nnU-Net label name -> class), optional `masks` (the structures a
    TotalSegmentator-layout download holds: the others are not annotated) and optional
    `phantoms` ({n, seed, shape, spacing, structures}: synthetic phantoms written into the root
    on first use, labelling `structures` in the nnU-Net layout); ConfigError naming the entry
    otherwise."""
    checked: list[dict[str, Any]] = []
    names = set(main_names)
    for i, entry in enumerate(datasets):
        entry = plain(entry)
        if not isinstance(entry, dict):
            raise ConfigError(f"data.datasets[{i}]: expected a mapping with name and root, got "
                              f"{entry!r}")
        missing = [k for k in DATASET_KEYS if not entry.get(k)]
        unknown = sorted(set(entry) - set(DATASET_KEYS) - set(DATASET_OPTIONS))
        if missing or unknown:
            raise ConfigError(f"data.datasets[{i}]: " + (
                f"{', '.join(missing)} missing" if missing else f"unknown key {unknown[0]!r}")
                + f"; an entry holds {', '.join(DATASET_KEYS + DATASET_OPTIONS)}")
        name = str(entry["name"])
        if name in names:
            raise ConfigError(f"data.datasets[{i}]: name {name!r} is taken (names: "
                              f"{', '.join(sorted(names))}); give each dataset its own name")
        names.add(name)
        layout = entry.get("layout")
        if layout is not None and layout not in LAYOUTS:
            raise ConfigError(f"data.datasets.{name}.layout={layout}: choose one of "
                              f"{', '.join(LAYOUTS)} (or leave it out: recognised by its files)")
        rename = entry.get("rename") or {}
        if not isinstance(rename, dict):
            raise ConfigError(f"data.datasets.{name}.rename: expected a mapping label: class")
        masks = entry.get("masks")
        if masks is not None and (isinstance(masks, str) or not isinstance(masks, list)):
            raise ConfigError(f"data.datasets.{name}.masks: expected a list of structure names")
        phantoms = entry.get("phantoms")
        if phantoms is not None and (not isinstance(phantoms, dict)
                                     or set(phantoms) - set(PHANTOM_OPTIONS)):
            raise ConfigError(f"data.datasets.{name}.phantoms: expected a mapping of "
                              f"{', '.join(PHANTOM_OPTIONS)}")
        checked.append({"name": name, "root": str(entry["root"]), "layout": layout,
                        "rename": {str(k): str(v) for k, v in rename.items()},
                        "masks": None if masks is None else [str(m) for m in masks],
                        "phantoms": phantoms})
    return checked


class NamedErrors(TorchDataset):
    """A dataset whose read or preprocessing failures are DatasetErrors naming the subject's CT
    (and label) file, in the main process and in DataLoader workers alike."""

    def __init__(self, dataset: Dataset, records: Sequence[dict[str, Any]]) -> None:
        """Wrap `dataset`, whose item i comes from `records[i]`."""
        self.dataset, self.records = dataset, records

    def __len__(self) -> int:
        """Number of records."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        """Item `index` of the wrapped dataset, or a DatasetError naming its files."""
        record = self.records[index]
        with blamed_on(record[IMAGE], f"cannot load or preprocess this subject (label map "
                                      f"{record[LABEL]})"):
            return self.dataset[index]
