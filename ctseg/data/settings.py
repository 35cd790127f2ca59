"""The data group's settings as dataclasses validated once on construction: every check of a data
key runs here, before any file is read; the DataModules read their settings from them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ctseg.config import plain
from ctseg.data.folds import NNUNET_SEED
from ctseg.data.phantoms import phantom_settings
from ctseg.data.records import check_datasets
from ctseg.data.sampling import check_dataset_weights
from ctseg.data.splits import STAGE_SPLITS, check_fold_settings, check_val_fraction
from ctseg.data.transforms import HU_WINDOW, PipelineConfig
from ctseg.data.volume_cache import DEFAULT_IMAGE_DTYPE, image_dtype
from ctseg.errors import ConfigError
from ctseg.label_space import LabelSpace

# Where the deterministic part of the pipeline is kept: the volume cache on disk, MONAI's
# CacheDataset in memory, or nowhere.
CACHES = ("disk", "memory", "none")


@dataclass(frozen=True)
class DataSettings:
    """The DataModule's settings (conf/data/totalseg_v1.yaml documents each key), normalised to
    builtins and checked together on construction; `hparams()` is what checkpoints record."""

    root: str | Sequence[str]
    version: str = "v1"
    spacing: float | Sequence[float] = 1.5
    intensity: str = "segresnet"
    hu_window: Sequence[float] = HU_WINDOW
    cache: str = "disk"
    cache_rate: float = 1.0
    cache_dir: str | None = None
    cache_image_dtype: str = DEFAULT_IMAGE_DTYPE
    prepared_dir: str | None = None
    patch_size: int | Sequence[int] = (96, 96, 96)
    batch_size: int = 2
    samples_per_volume: int = 1
    num_workers: int = 4
    val_fraction: float = 0.1
    seed: int = 0
    prepare_workers: int = 4
    smooth_sigma: float | None = None
    sampler: str = "random"
    val_crop: int | Sequence[int] | None = None
    num_folds: int | None = None
    fold: int | None = None
    fold_seed: int = NNUNET_SEED
    splits_file: str | None = None
    datasets: Sequence[Mapping[str, Any]] = ()
    extra_classes: Sequence[str] = ()
    dataset_weights: Mapping[str, float] | None = None
    # Derived on construction: the label space and the preprocessing pipeline.
    space: LabelSpace = field(init=False, repr=False, compare=False)
    pipeline: PipelineConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check every key (ValueError or ConfigError naming it) and store the normalised values:
        paths as strings, sequences as lists, data.datasets entries checked, smooth_sigma
        resolved (never None: predict.py reads what the checkpoint was trained with)."""
        space = LabelSpace.of(self.version, self.extra_classes)
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {', '.join(CACHES)}")
        if not 0 < self.cache_rate <= 1:
            raise ValueError(f"cache_rate must be in (0, 1], got {self.cache_rate}")
        image_dtype(self.cache_image_dtype)
        if self.batch_size < 1 or self.num_workers < 0 or self.prepare_workers < 1:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, prepare_workers >= 1; got "
                             f"{self.batch_size}, {self.num_workers}, {self.prepare_workers}")
        one_root = isinstance(self.root, str | os.PathLike)
        roots = [str(self.root)] if one_root else [str(r) for r in self.root]
        if not roots:
            raise ValueError("root must name at least one dataset folder")
        pipeline = PipelineConfig(spacing=plain(self.spacing), intensity=self.intensity,
                                  hu_window=plain(self.hu_window),
                                  patch_size=plain(self.patch_size),
                                  samples_per_volume=self.samples_per_volume,
                                  smooth_sigma=self.smooth_sigma, sampler=self.sampler,
                                  num_classes=space.num_classes)
        check_val_fraction(self.val_fraction)
        check_fold_settings(self.num_folds, self.fold, self.splits_file)
        datasets = check_datasets(self.datasets, [Path(r).name for r in roots])
        weights = check_dataset_weights(self.dataset_weights, [
            *(Path(r).name for r in roots), *(e["name"] for e in datasets)])
        normalised = {
            "root": roots[0] if one_root else roots, "spacing": plain(self.spacing),
            "hu_window": plain(self.hu_window), "patch_size": plain(self.patch_size),
            "val_crop": plain(self.val_crop), "smooth_sigma": pipeline.smooth_sigma,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "prepared_dir": None if self.prepared_dir is None else str(self.prepared_dir),
            "splits_file": None if self.splits_file is None else str(self.splits_file),
            "datasets": datasets, "extra_classes": list(space.extra), "dataset_weights": weights,
            "space": space, "pipeline": pipeline}
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def roots(self) -> list[str]:
        """The dataset roots in the layout of the download, in order."""
        return [self.root] if isinstance(self.root, str) else list(self.root)

    def hparams(self) -> dict[str, Any]:
        """The settings as plain hyper-parameters (predict reads them from the checkpoint)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


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


@dataclass(frozen=True)
class PhantomSourceSettings:
    """The phantom DataModule's own settings (conf/data/phantoms.yaml): the phantom root, the
    phantoms' settings (None: phantom_defaults()'), the extra roots appended to it and how their
    subjects join (`extra_split`, `extra_repeat`), and the structures the phantoms annotate."""

    root: str
    n_phantoms: int | None = None
    phantom_seed: int | None = None
    phantom_shape: Sequence[int] | None = None
    phantom_spacing: float | None = None
    extra_roots: Sequence[str] = ()
    extra_split: str | None = None
    extra_repeat: int = 1
    masks: Sequence[str] | None = None

    def __post_init__(self) -> None:
        """Check the extra roots' settings and resolve the phantoms' (the defaults for None)."""
        if self.extra_split is not None and self.extra_split not in STAGE_SPLITS["fit"] + (
                "test",):
            raise ValueError(f"extra_split must be train, val, test or null, got "
                             f"{self.extra_split!r}")
        if self.extra_repeat < 1:
            raise ValueError(f"extra_repeat must be >= 1, got {self.extra_repeat}")
        extras = [str(r) for r in self.extra_roots]
        missing_extra_roots(extras)
        phantoms = phantom_settings(self.n_phantoms, self.phantom_seed, self.phantom_shape,
                                    self.phantom_spacing)
        normalised = {
            "root": str(self.root), "n_phantoms": phantoms.n, "phantom_seed": phantoms.seed,
            "phantom_shape": [int(s) for s in phantoms.shape],
            "phantom_spacing": phantoms.spacing, "extra_roots": extras,
            "masks": None if self.masks is None else [str(m) for m in self.masks]}
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def roots(self) -> list[str]:
        """The phantom root, then the extra roots."""
        return [self.root, *self.extra_roots]

    def hparams(self) -> dict[str, Any]:
        """The settings as plain hyper-parameters, the phantom root as `phantom_root`."""
        return {"phantom_root": self.root, "n_phantoms": self.n_phantoms,
                "phantom_seed": self.phantom_seed, "phantom_shape": self.phantom_shape,
                "phantom_spacing": self.phantom_spacing, "extra_roots": self.extra_roots,
                "extra_split": self.extra_split, "extra_repeat": self.extra_repeat,
                "masks": self.masks}
