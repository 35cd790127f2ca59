"""The Lightning DataModule: train/val/test loaders over dataset roots (TotalSegmentator downloads,
nnU-Net datasets, synthetic phantoms) as cached MONAI data. Its settings: ctseg.data.settings;
records: ctseg.data.records; splits and folds: ctseg.data.splits, ctseg.data.folds; sampling and
DDP shards: ctseg.data.sampling."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from monai.data import CacheDataset, DataLoader, Dataset
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import DistributedSampler

from ctseg.data.folds import Fold, make_folds, read_splits
from ctseg.data.layout import META, detect_layout
from ctseg.data.merge import PreparedDataset, cache_root, default_prepared_dir, prepare
from ctseg.data.nnunet import prepare_nnunet
from ctseg.data.phantoms import ensure_phantoms
from ctseg.data.records import NamedErrors, make_record
from ctseg.data.sampling import WeightedDraws, dataset_shares, sampling_weights, shard
from ctseg.data.settings import DataSettings, PhantomSourceSettings
from ctseg.data.splits import STAGE_SPLITS, fold_records, split_validation, unique_ids
from ctseg.data.transforms import DATASET, IMAGE, eval_transforms, train_transforms
from ctseg.data.volume_cache import CachedPatches, CachedVolumes, VolumeCache
from ctseg.errors import ConfigError
from ctseg.label_space import LabelSpace
from ctseg.labels import label_names

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`<cache_root()>/tensors`: `$CTSEG_CACHE/tensors` or ~/.cache/ctseg/tensors."""
    return cache_root() / "tensors"


class SegmentationDataModule(LightningDataModule):
    """Train/val/test loaders over one or more dataset roots in the layout of the TotalSegmentator
    download, plus the data.datasets entries (either layout).

    Labels are merged once per root by `ctseg.data.merge.prepare`; splits come from meta.csv (a
    seeded `val_fraction` of train when it has no val rows). The deterministic transforms are
    cached on disk (`cache_dir/<pipeline fingerprint>/`), in memory, or not at all. Under DDP each
    rank keeps only its shard of every split. Training batches hold `batch_size *
    samples_per_volume` random patches; validation/test batches one whole volume.
    """

    def __init__(self, root: str | Sequence[str], **settings: Any) -> None:
        """Validate the settings (`DataSettings`: each key and its default); record them as plain
        hyper-parameters (predict reads them)."""
        super().__init__()
        self.settings = DataSettings(root=root, **settings)
        self.space: LabelSpace = self.settings.space
        self.pipeline = self.settings.pipeline
        self.roots = self.settings.roots
        self.extra_datasets = list(self.settings.datasets)
        self.save_hyperparameters(self.settings.hparams())
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
        base = Path(self.settings.cache_dir) if self.settings.cache_dir else default_cache_dir()
        return VolumeCache(base, self.pipeline, self.settings.cache_image_dtype)

    @property
    def tensor_cache_dir(self) -> Path:
        """Folder of the disk cache for this pipeline: `<cache_dir>/<fingerprint>`."""
        return self.volume_cache.root

    def _prepared_out(self, root: str) -> Path | None:
        """Where `root`'s merged labels go: prepared_dir itself for one root, a subfolder per root
        (named like the default) when several share it; None for the default location."""
        if self.settings.prepared_dir is None:
            return None
        base = Path(self.settings.prepared_dir)
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
                        out=self._prepared_out(root), workers=self.settings.prepare_workers))
                else:
                    self._prepared.append(self._prepare_root(root, entry["masks"]))
        return self._prepared

    def _prepare_root(self, root: str, masks: list[str] | None) -> PreparedDataset:
        """Merge the masks (all of the version's, or `masks`) of a TotalSegmentator-layout root."""
        return prepare(root, out=self._prepared_out(root), version=self.settings.version,
                       workers=self.settings.prepare_workers, masks=masks)

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
                                self.settings.version, **entry["phantoms"])
        self._prepare_all()

    def _split_records(self) -> dict[str, list[dict[str, Any]]]:
        """Records of all roots by split, with the val_fraction fallback applied."""
        splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
        repeats: dict[str, int] = {}
        prepared_all = self._prepare_all()
        # A TotalSegmentator-layout record annotates its version's classes (or its masks'),
        # never the extra classes other datasets bring.
        version_classes = self.space.annotated(range(len(label_names(self.settings.version))))

        def flags(record: Mapping[str, Any]) -> list[bool]:
            given = list(record.get("annotated", version_classes))
            return given + [False] * (self.num_classes - len(given))

        partial = any(not all(flags(r)) for p in prepared_all for r in p.records)
        for index, prepared in enumerate(prepared_all):
            added = index >= len(self.roots)  # a data.datasets entry: its own splits, no repeats
            own: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
            for split, records in prepared.by_split().items():
                own[split if added else self._split_of(index, split)] += [
                    make_record(r, self._dataset_name(index), flags(r) if partial else None)
                    for r in records]
                repeats.update((r["image"], 1 if added else self._train_repeats(index))
                               for r in records)
            if added and own["train"] and not own["val"] and self.settings.fold is None:
                # An added dataset without val subjects gets its own, so it is validated too.
                own["train"], own["val"] = split_validation(
                    own["train"], self.settings.val_fraction, self.settings.seed)
            for split, records in own.items():
                splits[split] += records
        if self.settings.fold is not None:
            splits["train"], splits["val"] = self._fold_split(splits["train"] + splits["val"])
        elif not splits["val"] and splits["train"]:
            splits["train"], splits["val"] = split_validation(
                splits["train"], self.settings.val_fraction, self.settings.seed)
            log.info("no val rows in meta.csv: using %d of %d train subjects for validation",
                     len(splits["val"]), len(splits["train"]) + len(splits["val"]))
        # Oversampling after the validation split, so no copy of a subject lands in val.
        splits["train"] = [r for r in splits["train"] for _ in range(repeats[r[IMAGE]])]
        return splits

    def _fold_split(self, pool: list[dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Train and val records of fold `fold` of the train + val `pool` (the folds kept in
        `self.folds`, which training writes beside the checkpoints)."""
        settings = self.settings
        ids = unique_ids(pool)
        self.folds = (read_splits(settings.splits_file) if settings.splits_file
                      else make_folds(ids, settings.num_folds, settings.fold_seed))
        train, val = fold_records(pool, self.folds, settings.fold, settings.splits_file,
                                  self.roots)
        log.info("fold %d of %d: %d train and %d val subjects (test split untouched)",
                 settings.fold, len(self.folds), len(train), len(val))
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
            records = shard(splits[split], rank, world_size, self.settings.seed,
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
        crop = self.settings.val_crop if split == "val" else None
        if self.settings.cache == "disk":
            cache = self.volume_cache
            cache.warm(records, self.settings.prepare_workers, progress=True)
            log.info("%s volumes cached for %s in %s (%.2f GB on disk for this pipeline)",
                     len(records), split, cache.root, cache.size_on_disk() / 1e9)
            if split == "train":
                return CachedPatches(self.volume_cache, records)
            return CachedVolumes(self.volume_cache, records, crop)
        transform = (train_transforms(self.pipeline) if split == "train"
                     else eval_transforms(self.pipeline, crop))
        if self.settings.cache == "memory":
            return CacheDataset(records, transform, cache_rate=self.settings.cache_rate,
                                num_workers=self.settings.num_workers or None, progress=False)
        return Dataset(records, transform)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader | list:
        """DataLoader over this rank's `split`; under DDP with a non-sharding DistributedSampler
        so that Lightning does not split the already sharded records again."""
        if split not in self.datasets:
            return []
        dataset = NamedErrors(self.datasets[split], self.records[split])
        sampler = None
        weights = self.settings.dataset_weights
        if split == "train" and weights:
            names = [r[DATASET] for r in self.records[split]]
            shares = dataset_shares(names, weights)
            sampler = WeightedDraws(dataset, sampling_weights(names, shares), self.settings.seed)
            log.info("training draws per dataset (data.dataset_weights): %s", ", ".join(
                f"{n} {100 * v:.0f} %" for n, v in shares.items()))
        elif self.world_size > 1:
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle,
                                         seed=self.settings.seed)
        workers = self.settings.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader | list:
        """Shuffled batches of random patches (`batch_size` volumes x `samples_per_volume`)."""
        return self._loader("train", self.settings.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Whole validation volumes, one per batch ([] when there is none)."""
        return self._loader("val", 1, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        """Whole test volumes, one per batch."""
        return self._loader("test", 1, shuffle=False)


class PhantomDataModule(SegmentationDataModule):
    """SegmentationDataModule over synthetic phantoms written on first use into `root`, plus
    optional `extra_roots` (e.g. the real crop), whose subjects join their meta.csv split, or
    `extra_split` for all of them, `extra_repeat` times in training."""

    def __init__(self, root: str, **settings: Any) -> None:
        """Check the phantom settings (`PhantomSourceSettings`: each key and its default, None
        for conf/data/phantoms.yaml's); the other settings go to SegmentationDataModule."""
        own = {f.name for f in fields(PhantomSourceSettings)}
        self.phantoms = PhantomSourceSettings(
            root=root, **{k: v for k, v in settings.items() if k in own})
        super().__init__(root=self.phantoms.roots,
                         **{k: v for k, v in settings.items() if k not in own})
        self.phantom_shape = tuple(self.phantoms.phantom_shape)
        # root is rebuilt from the phantom root and extra_roots; keeping it would pass it twice.
        self.remove_ignored_hparams(["root"])
        self.save_hyperparameters(self.phantoms.hparams())

    def _split_of(self, root_index: int, split: str) -> str:
        """Extra roots (index >= 1) join `extra_split` when it is set."""
        extra_split = self.phantoms.extra_split
        return extra_split if root_index and extra_split else split

    def _train_repeats(self, root_index: int) -> int:
        """Extra subjects appear `extra_repeat` times in training (oversampled)."""
        return self.phantoms.extra_repeat if root_index else 1

    def _root_masks(self, index: int) -> list[str] | None:
        """The phantom root (index 0) annotates `masks`."""
        return self.phantoms.masks if index == 0 else None

    def prepare_data(self) -> None:
        """Write the phantoms unless phantom_root already holds phantoms of the same settings,
        then merge the label maps of every root."""
        phantoms = self.phantoms
        if ensure_phantoms(phantoms.root, "totalseg", self.settings.version, phantoms.n_phantoms,
                           phantoms.phantom_seed, self.phantom_shape,
                           spacing=phantoms.phantom_spacing):
            self._prepared = None  # new phantoms: merge again
        super().prepare_data()
