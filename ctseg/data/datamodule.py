"""Lightning DataModules: TotalSegmentator folders and synthetic phantoms as cached MONAI data."""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from lightning import LightningDataModule
from monai.data import CacheDataset, DataLoader, Dataset
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import DistributedSampler

from ctseg.config import plain
from ctseg.data.folds import NNUNET_SEED, Fold, make_folds, read_splits
from ctseg.data.layout import META, detect_layout
from ctseg.data.merge import PreparedDataset, cache_root, default_prepared_dir, prepare
from ctseg.data.nnunet import prepare_nnunet
from ctseg.data.phantoms import (
    LAYOUTS,
    phantom_record,
    phantom_settings,
    phantoms_current,
    write_phantoms,
)
from ctseg.data.transforms import (
    ANNOTATED,
    DATASET,
    HU_WINDOW,
    IMAGE,
    LABEL,
    PipelineConfig,
    eval_transforms,
    train_transforms,
)
from ctseg.data.volume_cache import (
    DEFAULT_IMAGE_DTYPE,
    CachedPatches,
    CachedVolumes,
    VolumeCache,
    image_dtype,
)
from ctseg.errors import ConfigError, blamed_on
from ctseg.label_space import LabelSpace
from ctseg.labels import label_names

log = logging.getLogger(__name__)

CACHES = ("disk", "memory", "none")
# Record key holding the subject id. Not "image_id": MONAI treats keys starting with "image_" as
# the image's metadata dictionary.
SUBJECT = "subject"
# Keys of a data.datasets entry: required, optional.
DATASET_KEYS = ("name", "root")
DATASET_OPTIONS = ("layout", "rename", "masks", "phantoms")
# Keys of a data.datasets entry's `phantoms` (synthetic phantoms written into its root).
PHANTOM_OPTIONS = ("n", "seed", "shape", "spacing", "structures")
# Splits each stage reads; the first one must be non-empty.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def default_cache_dir() -> Path:
    """`<cache_root()>/tensors`: `$CTSEG_CACHE/tensors` or ~/.cache/ctseg/tensors."""
    return cache_root() / "tensors"


def shard(records: Sequence[Any], rank: int, world_size: int, seed: int = 0,
          pad: bool = True) -> list[Any]:
    """The records of DDP rank `rank`: a seeded permutation split round-robin, disjoint and
    covering. `pad` repeats records so every rank gets ceil(len / world_size) (training steps
    stay in step); without it (evaluation, where a repeat would count a subject twice) ranks
    differ by at most one record, and only fewer records than ranks are padded to one each."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    if not records:
        return []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    total = math.ceil(len(order) / world_size) * world_size if pad else max(len(order),
                                                                             world_size)
    padded = [order[i % len(order)] for i in range(total)]
    return [records[i] for i in padded[rank::world_size]]


def split_validation(train: list[dict], fraction: float,
                     seed: int) -> tuple[list[dict], list[dict]]:
    """Move a seeded `fraction` of `train` (at least one when it has >= 2 and fraction > 0, never
    all of it) to validation; return (train, val)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = 0
    if fraction > 0 and len(train) >= 2:
        n_val = min(max(1, round(fraction * len(train))), len(train) - 1)
    chosen = set(random.Random(seed).sample(range(len(train)), n_val))
    return ([r for i, r in enumerate(train) if i not in chosen],
            [r for i, r in enumerate(train) if i in chosen])


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


def check_dataset_weights(weights: Mapping[str, float] | None, names: Sequence[str]
                          ) -> dict[str, float] | None:
    """data.dataset_weights as {dataset name: weight}, every name a dataset's and the weights
    non-negative with a positive sum; None (sampling proportional to size) when not given."""
    if not weights:
        return None
    weights = plain(weights)
    if not isinstance(weights, dict):
        raise ConfigError(f"data.dataset_weights: expected a mapping dataset name: weight, got "
                          f"{weights!r}")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"data.dataset_weights: {unknown[0]!r} is not a dataset (the datasets: "
                          f"{', '.join(names)})")
    try:
        checked = {str(k): float(v) for k, v in weights.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"data.dataset_weights: weights must be numbers, got {weights}") from None
    if any(v < 0 or not math.isfinite(v) for v in checked.values()) or not sum(checked.values()):
        raise ConfigError(f"data.dataset_weights: weights must be >= 0 with a positive sum, got "
                          f"{checked}")
    return checked


def dataset_shares(datasets: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Each dataset's share of the training draws: its weight over those of the datasets the
    training records (named by their dataset) come from; a dataset not in `weights` gets none."""
    present = dict.fromkeys(datasets)
    total = sum(weights.get(name, 0.0) for name in present)
    if not total:
        raise ConfigError(f"data.dataset_weights: {dict(weights)} gives no weight to a dataset "
                          f"with training subjects ({', '.join(sorted(present))})")
    return {name: weights.get(name, 0.0) / total for name in present}


def sampling_weights(datasets: Sequence[str], shares: Mapping[str, float]) -> list[float]:
    """Per training record (named by its dataset), the weight that draws each dataset with its
    share; records of one dataset equally."""
    sizes = Counter(datasets)
    return [shares[name] / sizes[name] for name in datasets]


class WeightedDraws(DistributedSampler):
    """As many draws per epoch as records, with replacement, by `weights` (seeded by seed and
    epoch). A DistributedSampler of one replica, like the unweighted loaders under DDP, so that
    Lightning does not split this rank's already sharded records again."""

    def __init__(self, dataset: TorchDataset, weights: Sequence[float], seed: int) -> None:
        """Draw indices of `dataset` with probability proportional to `weights`."""
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.weights = torch.tensor(weights, dtype=torch.double)

    def __iter__(self) -> Iterator[int]:
        """This epoch's draws."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True,
                                      generator=generator).tolist())


def ensure_phantoms(root: str | os.PathLike[str], layout: str, version: str,
                    n: int | None = None, seed: int | None = None,
                    shape: Sequence[int] | None = None, structures: Sequence[str] | None = None,
                    spacing: float | None = None) -> bool:
    """Write phantoms into `root` unless it holds phantoms written with the same settings (every
    one that changes their files: `phantom_record`; None: the defaults); whether it wrote them.
    A file lock beside `root` lets the nodes of a multi-node job (one shared filesystem) prepare
    at the same time."""
    record = phantom_record(n, seed, version, shape, spacing, layout, structures)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if phantoms_current(root, record):
            return False
        write_phantoms(root, n, seed=seed, version=version, shape=shape, spacing=spacing,
                       layout=layout, structures=structures)
        return True


def check_fold_settings(num_folds: int | None, fold: int | None, splits_file: str | None) -> None:
    """ConfigError unless the cross-validation keys fit together: data.fold with data.num_folds
    or data.splits_file (not both), or none of them."""
    if fold is None:
        if num_folds is not None or splits_file is not None:
            raise ConfigError("data.fold is not set: choose the fold to train (data.fold=0; all "
                              "of them: python train.py -m data.fold=0,1,2,3,4)")
        return
    if (num_folds is None) == (splits_file is None):
        raise ConfigError(f"data.fold={fold} needs data.num_folds=K (folds made from meta.csv) "
                          "or data.splits_file=<splits_final.json>, one of them")
    if fold < 0:
        raise ConfigError(f"data.fold={fold}: folds are numbered from 0")


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


class TotalSegmentatorDataModule(LightningDataModule):
    """Train/val/test loaders over one or more TotalSegmentator folders.

    Labels are merged once per root by `ctseg.data.merge.prepare`; splits come from meta.csv (a
    seeded `val_fraction` of train when it has no val rows). The deterministic transforms are
    cached on disk (`cache_dir/<pipeline fingerprint>/`), in memory, or not at all. Under DDP each
    rank keeps only its shard of every split. Training batches hold `batch_size *
    samples_per_volume` random patches; validation/test batches one whole volume.
    """

    def __init__(
        self,
        root: str | Sequence[str],
        version: str = "v1",
        spacing: float | Sequence[float] = 1.5,
        intensity: str = "segresnet",
        hu_window: Sequence[float] = HU_WINDOW,
        cache: str = "disk",
        cache_rate: float = 1.0,
        cache_dir: str | None = None,
        cache_image_dtype: str = DEFAULT_IMAGE_DTYPE,
        prepared_dir: str | None = None,
        patch_size: int | Sequence[int] = (96, 96, 96),
        batch_size: int = 2,
        samples_per_volume: int = 1,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        seed: int = 0,
        prepare_workers: int = 4,
        smooth_sigma: float | None = None,
        sampler: str = "random",
        val_crop: int | Sequence[int] | None = None,
        num_folds: int | None = None,
        fold: int | None = None,
        fold_seed: int = NNUNET_SEED,
        splits_file: str | None = None,
        datasets: Sequence[Mapping[str, Any]] = (),
        extra_classes: Sequence[str] = (),
        dataset_weights: Mapping[str, float] | None = None,
    ) -> None:
        """Validate the settings; record them as plain hyper-parameters (predict reads them)."""
        super().__init__()
        self.space = LabelSpace.of(version, extra_classes)
        if cache not in CACHES:
            raise ValueError(f"unknown cache {cache!r}; choose one of {', '.join(CACHES)}")
        if not 0 < cache_rate <= 1:
            raise ValueError(f"cache_rate must be in (0, 1], got {cache_rate}")
        image_dtype(cache_image_dtype)
        if batch_size < 1 or num_workers < 0 or prepare_workers < 1:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, prepare_workers >= 1; got "
                             f"{batch_size}, {num_workers}, {prepare_workers}")
        roots = [str(root)] if isinstance(root, str | os.PathLike) else [str(r) for r in root]
        if not roots:
            raise ValueError("root must name at least one dataset folder")
        self.pipeline = PipelineConfig(spacing=plain(spacing), intensity=intensity,
                                       hu_window=plain(hu_window),
                                       patch_size=plain(patch_size),
                                       samples_per_volume=samples_per_volume,
                                       smooth_sigma=smooth_sigma, sampler=sampler,
                                       num_classes=self.space.num_classes)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_fold_settings(num_folds, fold, splits_file)
        self.roots = roots
        self.extra_datasets = check_datasets(datasets, [Path(r).name for r in roots])
        weights = check_dataset_weights(dataset_weights, [
            *(Path(r).name for r in roots), *(e["name"] for e in self.extra_datasets)])
        self.save_hyperparameters({
            "root": roots[0] if isinstance(root, str | os.PathLike) else roots,
            "version": version, "spacing": plain(spacing), "intensity": intensity,
            "hu_window": plain(hu_window), "cache": cache, "cache_rate": cache_rate,
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "cache_image_dtype": cache_image_dtype,
            "prepared_dir": None if prepared_dir is None else str(prepared_dir),
            "patch_size": plain(patch_size), "batch_size": batch_size,
            "samples_per_volume": samples_per_volume, "num_workers": num_workers,
            "val_fraction": val_fraction, "seed": seed, "prepare_workers": prepare_workers,
            # resolved (never None): predict.py reads what the checkpoint was trained with
            "smooth_sigma": self.pipeline.smooth_sigma, "sampler": sampler,
            "val_crop": plain(val_crop), "num_folds": num_folds, "fold": fold,
            "fold_seed": fold_seed,
            "splits_file": None if splits_file is None else str(splits_file),
            "datasets": self.extra_datasets, "extra_classes": list(self.space.extra),
            "dataset_weights": weights,
        })
        self.folds: list[Fold] = []
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.datasets: dict[str, TorchDataset] = {}
        self._prepared: list[PreparedDataset] | None = None
        self.world_size = 1

    @property
    def num_classes(self) -> int:
        """Output channels of the label space, background included."""
        return self.space.num_classes

    @property
    def label_names(self) -> list[str]:
        """Class names in channel order, "background" first."""
        return self.space.names

    @cached_property
    def volume_cache(self) -> VolumeCache:
        """The disk cache of this pipeline's preprocessed volumes (`cache=disk`)."""
        base = Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_cache_dir()
        return VolumeCache(base, self.pipeline, self.hparams.cache_image_dtype)

    @property
    def tensor_cache_dir(self) -> Path:
        """Folder of the disk cache for this pipeline: `<cache_dir>/<fingerprint>`."""
        return self.volume_cache.root

    def _prepared_out(self, root: str) -> Path | None:
        """Where `root`'s merged labels go: prepared_dir itself for one root, a subfolder per root
        (named like the default) when several share it; None for the default location."""
        if self.hparams.prepared_dir is None:
            return None
        base = Path(self.hparams.prepared_dir)
        alone = len(self.roots) == 1 and not self.extra_datasets
        return base if alone else base / default_prepared_dir(root).name

    def _prepare_all(self) -> list[PreparedDataset]:
        """Merge (or find already merged) the label maps of every root, once per instance: the
        pre-flight checks, prepare_data and setup of one run share the result instead of each
        checking every mask of the download again."""
        if self._prepared is None:
            self._prepared = [self._prepare_root(root, self._root_masks(index))
                              for index, root in enumerate(self.roots)]
            for entry in self.extra_datasets:
                root = entry["root"]
                if (entry["layout"] or detect_layout(root)) == "nnunet":
                    self._prepared.append(prepare_nnunet(
                        root, self.space, entry["name"], entry["rename"],
                        out=self._prepared_out(root), workers=self.hparams.prepare_workers))
                else:
                    self._prepared.append(self._prepare_root(root, entry["masks"]))
        return self._prepared

    def _prepare_root(self, root: str, masks: list[str] | None) -> PreparedDataset:
        """Merge the masks (all of the version's, or `masks`) of a TotalSegmentator-layout root."""
        return prepare(root, out=self._prepared_out(root), version=self.hparams.version,
                       workers=self.hparams.prepare_workers, masks=masks)

    def _root_masks(self, index: int) -> list[str] | None:
        """The masks root `index` holds (None: every mask of the version)."""
        return None

    @property
    def dataset_names(self) -> list[str]:
        """The datasets evaluated one by one (`val/<name>/...`): every root's and data.datasets
        entry's name when data.datasets is used, else none."""
        if not self.extra_datasets:
            return []
        return [self._dataset_name(i) for i in range(len(self.roots) + len(self.extra_datasets))]

    def _dataset_name(self, index: int) -> str:
        """Name of prepared dataset `index`: its root folder's, or its data.datasets entry's."""
        if index < len(self.roots):
            return Path(self.roots[index]).name
        return self.extra_datasets[index - len(self.roots)]["name"]

    def prepare_data(self) -> None:
        """Write the phantoms of data.datasets entries that ask for them, then merge label maps
        once per node (idempotent: unchanged subjects are skipped)."""
        for entry in self.extra_datasets:
            if entry["phantoms"] is not None:
                ensure_phantoms(entry["root"], entry["layout"] or "totalseg",
                                self.hparams.version, **entry["phantoms"])
        self._prepare_all()

    def _split_records(self) -> dict[str, list[dict[str, Any]]]:
        """Records of all roots by split, with the val_fraction fallback applied."""
        splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
        repeats: dict[str, int] = {}
        prepared_all = self._prepare_all()
        # A TotalSegmentator-layout record annotates its version's classes (or its masks'),
        # never the extra classes other datasets bring.
        version_classes = self.space.annotated(range(len(label_names(self.hparams.version))))

        def flags(record: Mapping[str, Any]) -> list[bool]:
            given = list(record.get("annotated", version_classes))
            return given + [False] * (self.num_classes - len(given))

        partial = any(not all(flags(r)) for p in prepared_all for r in p.records)
        for index, prepared in enumerate(prepared_all):
            added = index >= len(self.roots)  # a data.datasets entry: its own splits, no repeats
            own: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
            for split, records in prepared.by_split().items():
                own[split if added else self._split_of(index, split)] += [
                    {IMAGE: r["image"], LABEL: r["label"], SUBJECT: r["image_id"],
                     DATASET: self._dataset_name(index),
                     **({ANNOTATED: torch.tensor(flags(r))} if partial else {})}
                    for r in records]
                repeats.update((r["image"], 1 if added else self._train_repeats(index))
                               for r in records)
            if added and own["train"] and not own["val"] and self.hparams.fold is None:
                # An added dataset without val subjects gets its own, so it is validated too.
                own["train"], own["val"] = split_validation(
                    own["train"], self.hparams.val_fraction, self.hparams.seed)
            for split, records in own.items():
                splits[split] += records
        if self.hparams.fold is not None:
            splits["train"], splits["val"] = self._fold_split(splits["train"] + splits["val"])
        elif not splits["val"] and splits["train"]:
            splits["train"], splits["val"] = split_validation(
                splits["train"], self.hparams.val_fraction, self.hparams.seed)
            log.info("no val rows in meta.csv: using %d of %d train subjects for validation",
                     len(splits["val"]), len(splits["train"]) + len(splits["val"]))
        # Oversampling after the validation split, so no copy of a subject lands in val.
        splits["train"] = [r for r in splits["train"] for _ in range(repeats[r[IMAGE]])]
        return splits

    def _fold_split(self, pool: list[dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Train and val records of fold `fold` of the train + val `pool` (the folds kept in
        `self.folds`, which training writes beside the checkpoints)."""
        hp = self.hparams
        ids = [r[SUBJECT] for r in pool]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ConfigError(f"data.fold: subject id {repeated[0]} appears in more than one data "
                              "root; cross-validation needs unique subject ids")
        self.folds = (read_splits(hp.splits_file) if hp.splits_file
                      else make_folds(ids, hp.num_folds, hp.fold_seed))
        if not 0 <= hp.fold < len(self.folds):
            raise ConfigError(f"data.fold={hp.fold}: choose 0..{len(self.folds) - 1}")
        chosen = self.folds[hp.fold]
        unknown = sorted((set(chosen["train"]) | set(chosen["val"])) - set(ids))
        if unknown:
            raise ConfigError(f"data.splits_file={hp.splits_file}: subject {unknown[0]} of fold "
                              f"{hp.fold} is not in the train + val pool of "
                              f"{', '.join(self.roots)}")
        by_id = {r[SUBJECT]: r for r in pool}
        train, val = [by_id[i] for i in chosen["train"]], [by_id[i] for i in chosen["val"]]
        log.info("fold %d of %d: %d train and %d val subjects (test split untouched)", hp.fold,
                 len(self.folds), len(train), len(val))
        return train, val

    def _split_of(self, root_index: int, split: str) -> str:
        """The split that subjects of root `root_index` with meta.csv split `split` join."""
        return split

    def _train_repeats(self, root_index: int) -> int:
        """How often each subject of root `root_index` appears in training (oversampling)."""
        return 1

    def split_sizes(self) -> dict[str, int]:
        """Subjects per split over all roots (val_fraction applied), merging labels if needed."""
        return {split: len(records) for split, records in self._split_records().items()}

    def meta_files(self) -> str:
        """The meta.csv files of all roots, comma-separated, for messages."""
        return ", ".join(str(Path(r) / META) for r in self.roots)

    def setup(self, stage: str | None = None, rank: int | None = None,
              world_size: int | None = None) -> None:
        """Build this rank's datasets for `stage` (fit, validate, test; None: all available).

        `rank`/`world_size` default to the attached trainer's (0 and 1 without one).
        """
        trainer = self.trainer
        rank = rank if rank is not None else (trainer.global_rank if trainer else 0)
        if world_size is None:
            world_size = trainer.world_size if trainer else 1
        self.world_size = world_size
        splits = self._split_records()
        wanted = STAGE_SPLITS.get(stage, ()) if stage else ("train", "val", "test")
        if stage in STAGE_SPLITS and not splits[wanted[0]]:
            raise ConfigError(f"{self.meta_files()}: no {wanted[0]!r} subject for stage "
                              f"{stage!r}; set the split column of meta.csv (train/val/test) or "
                              "add a dataset root")
        for split in wanted:
            if split != "train" and 0 < len(splits[split]) < world_size:
                log.warning("%d %s subjects for %d DDP ranks: some are evaluated twice",
                            len(splits[split]), split, world_size)
            records = shard(splits[split], rank, world_size, self.hparams.seed,
                            pad=split == "train")
            if split in self.datasets and records == self.records.get(split):
                continue
            self.records[split] = records
            if records:
                self.datasets[split] = self._dataset(records, split)
            else:
                log.warning("no %s subjects in %s", split, ", ".join(self.roots))
                self.datasets.pop(split, None)

    def _dataset(self, records: list[dict[str, Any]], split: str) -> TorchDataset:
        """A dataset over `records` of `split` with the configured cache: the volume cache
        (memory-mapped patches) for `disk`, MONAI's CacheDataset or Dataset otherwise."""
        crop = self.hparams.val_crop if split == "val" else None
        if self.hparams.cache == "disk":
            cache = self.volume_cache
            cache.warm(records, self.hparams.prepare_workers, progress=True)
            log.info("%s volumes cached for %s in %s (%.2f GB on disk for this pipeline)",
                     len(records), split, cache.root, cache.size_on_disk() / 1e9)
            if split == "train":
                return CachedPatches(self.volume_cache, records)
            return CachedVolumes(self.volume_cache, records, crop)
        transform = (train_transforms(self.pipeline) if split == "train"
                     else eval_transforms(self.pipeline, crop))
        if self.hparams.cache == "memory":
            return CacheDataset(records, transform, cache_rate=self.hparams.cache_rate,
                                num_workers=self.hparams.num_workers or None, progress=False)
        return Dataset(records, transform)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader | list:
        """DataLoader over this rank's `split`; under DDP with a non-sharding DistributedSampler
        so that Lightning does not split the already sharded records again."""
        if split not in self.datasets:
            return []
        dataset = NamedErrors(self.datasets[split], self.records[split])
        sampler = None
        weights = self.hparams.get("dataset_weights")
        if split == "train" and weights:
            names = [r[DATASET] for r in self.records[split]]
            shares = dataset_shares(names, weights)
            sampler = WeightedDraws(dataset, sampling_weights(names, shares), self.hparams.seed)
            log.info("training draws per dataset (data.dataset_weights): %s", ", ".join(
                f"{n} {100 * v:.0f} %" for n, v in shares.items()))
        elif self.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle,
                                         seed=self.hparams.seed)
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader | list:
        """Shuffled batches of random patches (`batch_size` volumes x `samples_per_volume`)."""
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Whole validation volumes, one per batch ([] when there is none)."""
        return self._loader("val", 1, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        """Whole test volumes, one per batch."""
        return self._loader("test", 1, shuffle=False)


def missing_extra_roots(roots: Sequence[str]) -> None:
    """Raise a ConfigError naming the first of `roots` that is not a folder, with the fixes (the
    embedded default reads the real crop from ../shared/data beside the clone)."""
    for root in roots:
        if not Path(root).is_dir():
            raise ConfigError(
                f"data.extra_roots: {os.path.normpath(root)} is not a folder. The embedded "
                "default adds the real crop from ../shared/data beside the clone: run from the "
                "clone, set "
                "CTSEG_SHARED_DATA to the folder holding totalseg_mini, or train on the "
                "phantoms only with data.extra_roots=[]")


class PhantomDataModule(TotalSegmentatorDataModule):
    """TotalSegmentatorDataModule over synthetic phantoms written on first use into `root`,
    plus optional `extra_roots` (e.g. the real crop), whose subjects join their meta.csv split, or
    `extra_split` for all of them."""

    def __init__(
        self,
        root: str,
        n_phantoms: int | None = None,
        phantom_seed: int | None = None,
        phantom_shape: Sequence[int] | None = None,
        phantom_spacing: float | None = None,
        extra_roots: Sequence[str] = (),
        extra_split: str | None = None,
        extra_repeat: int = 1,
        masks: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the phantom settings (None: the defaults, conf/data/phantoms.yaml's;
        `masks`: the structures the phantoms count as annotated, default all); other arguments
        go to TotalSegmentatorDataModule."""
        if extra_split is not None and extra_split not in STAGE_SPLITS["fit"] + ("test",):
            raise ValueError(f"extra_split must be train, val, test or null, got {extra_split!r}")
        if extra_repeat < 1:
            raise ValueError(f"extra_repeat must be >= 1, got {extra_repeat}")
        extras = [str(r) for r in extra_roots]
        missing_extra_roots(extras)
        super().__init__(root=[str(root), *extras], **kwargs)
        phantoms = phantom_settings(n_phantoms, phantom_seed, phantom_shape, phantom_spacing)
        self.phantom_shape = tuple(int(s) for s in phantoms.shape)
        # root is rebuilt from the phantom root and extra_roots; keeping it would pass it twice.
        self.remove_ignored_hparams(["root"])
        self.save_hyperparameters({
            "phantom_root": str(root), "n_phantoms": phantoms.n,
            "phantom_seed": phantoms.seed, "phantom_shape": list(self.phantom_shape),
            "phantom_spacing": phantoms.spacing,
            "extra_roots": extras, "extra_split": extra_split, "extra_repeat": extra_repeat,
            "masks": None if masks is None else [str(m) for m in masks],
        })

    def _split_of(self, root_index: int, split: str) -> str:
        """Extra roots (index >= 1) join `extra_split` when it is set."""
        return self.hparams.extra_split if root_index and self.hparams.extra_split else split

    def _train_repeats(self, root_index: int) -> int:
        """Extra subjects appear `extra_repeat` times in training (oversampled)."""
        return self.hparams.extra_repeat if root_index else 1

    def _root_masks(self, index: int) -> list[str] | None:
        """The phantom root (index 0) annotates `masks`."""
        return self.hparams.masks if index == 0 else None

    def prepare_data(self) -> None:
        """Write the phantoms unless phantom_root already holds phantoms of the same settings,
        then merge the label maps of every root."""
        if ensure_phantoms(self.hparams.phantom_root, "totalseg", self.hparams.version,
                           self.hparams.n_phantoms, self.hparams.phantom_seed, self.phantom_shape,
                           spacing=self.hparams.phantom_spacing):
            self._prepared = None  # new phantoms: merge again
        super().prepare_data()
