"""MONAI transform pipelines of ctseg: the wholeBody_ct_segmentation bundle's preprocessing.

Every pipeline is a deterministic prefix (load, orient, resample, intensity, foreground crop) that
MONAI's CacheDataset/PersistentDataset cache, followed, for training only, by random patches.

Intensity schemes (`PipelineConfig.intensity`):

- ``segresnet``: the bundle's configs/train.json — z-score over non-zero voxels, foreground crop
  (voxels > 0 after z-scoring, margin 10, size a multiple of the patch), Gaussian smoothing
  (sigma 0.4 voxel), rescale to [-1, 1].
- ``hu_window``: VISTA3D style — clip Hounsfield units to `hu_window` and map them to [0, 1], then
  crop to voxels above the window's lower bound (> 0) with the same margin and divisibility.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    GaussianSmoothd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

INTENSITIES = ("segresnet", "hu_window")
# Bump when the deterministic transforms change, so disk caches of older tensors are not reused.
TRANSFORM_VERSION = "1"
IMAGE, LABEL = "image", "label"
# Voxels added around the foreground box before rounding it up to a multiple of the patch size.
CROP_MARGIN = 10
# Nibabel's world axes (left->Right, posterior->Anterior, inferior->Superior), given explicitly.
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Gaussian smoothing of the bundle, in voxels.
SMOOTH_SIGMA = 0.4
# Label maps are kept as uint8 (up to 256 classes): a quarter of float32 in memory and disk caches.
LABEL_DTYPE = torch.uint8


def _triple(value: float | Sequence[float], name: str, kind: type) -> tuple:
    """`value` repeated to three axes (or checked to have three), each converted with `kind`
    (int values must be whole numbers)."""
    values = [value] * 3 if np.ndim(value) == 0 else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} needs one value or three (one per axis), got {value!r}")
    out = tuple(kind(v) for v in values)
    if kind is int and out != tuple(values):
        raise ValueError(f"{name} values must be whole numbers, got {value!r}")
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} values must be finite and > 0, got {value!r}")
    return out


@dataclass(frozen=True)
class PipelineConfig:
    """Preprocessing settings: voxel spacing (mm), intensity scheme, HU window, patch size and
    random patches per volume. Values are normalised to tuples on construction."""

    spacing: float | tuple[float, float, float] = 1.5
    intensity: str = "segresnet"
    hu_window: tuple[float, float] = (-963.8, 1053.7)
    patch_size: int | tuple[int, int, int] = (96, 96, 96)
    samples_per_volume: int = 1

    def __post_init__(self) -> None:
        """Validate every field and store spacing/patch_size as 3-tuples, hu_window as floats."""
        if self.intensity not in INTENSITIES:
            raise ValueError(f"unknown intensity scheme {self.intensity!r}; choose one of "
                             f"{', '.join(INTENSITIES)}")
        object.__setattr__(self, "spacing", _triple(self.spacing, "spacing", float))
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "patch_size", int))
        window = tuple(float(v) for v in self.hu_window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got "
                             f"{self.hu_window!r}")
        object.__setattr__(self, "hu_window", window)
        if int(self.samples_per_volume) != self.samples_per_volume or self.samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be an integer >= 1, got "
                             f"{self.samples_per_volume!r}")
        object.__setattr__(self, "samples_per_volume", int(self.samples_per_volume))

    def fingerprint(self) -> str:
        """Short hash of everything the cached (deterministic) transforms depend on; the name of
        the disk-cache folder, so a change of spacing or intensity never reuses stale tensors."""
        parts = {
            "version": TRANSFORM_VERSION,
            "spacing": self.spacing,
            "intensity": self.intensity,
            "hu_window": self.hu_window if self.intensity == "hu_window" else None,
            "k_divisible": self.patch_size,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _intensity(cfg: PipelineConfig, keys: Sequence[str]) -> list[MapTransform]:
    """Intensity scaling, foreground crop and padding to at least one patch, per scheme."""
    crop = [
        CropForegroundd(keys=keys, source_key=IMAGE, margin=CROP_MARGIN,
                        k_divisible=list(cfg.patch_size), allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=list(cfg.patch_size)),
    ]
    if cfg.intensity == "segresnet":
        return [
            NormalizeIntensityd(keys=IMAGE, nonzero=True),
            *crop,
            GaussianSmoothd(keys=IMAGE, sigma=SMOOTH_SIGMA),
            ScaleIntensityd(keys=IMAGE, minv=-1.0, maxv=1.0),
        ]
    low, high = cfg.hu_window
    return [ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                                 clip=True), *crop]


def _deterministic(cfg: PipelineConfig) -> list[MapTransform]:
    """Load, orient to RAS, resample to `cfg.spacing`, scale intensities and crop; image+label."""
    keys = (IMAGE, LABEL)
    return [
        LoadImaged(keys=IMAGE, image_only=True, dtype=np.float32),
        LoadImaged(keys=LABEL, image_only=True, dtype=np.uint8),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=AXIS_LABELS),
        Spacingd(keys=keys, pixdim=list(cfg.spacing), mode=("bilinear", "nearest")),
        *_intensity(cfg, keys),
        EnsureTyped(keys=IMAGE, dtype=torch.float32),
        EnsureTyped(keys=LABEL, dtype=LABEL_DTYPE),
    ]


def eval_transforms(cfg: PipelineConfig) -> Compose:
    """Validation/test pipeline: the deterministic prefix only, whole volumes (image and label)."""
    return Compose(_deterministic(cfg))


def train_transforms(cfg: PipelineConfig) -> Compose:
    """Training pipeline: the deterministic prefix, then `samples_per_volume` random patches of
    `patch_size` per volume (a list per item; collate with monai's list_data_collate)."""
    return Compose([
        *_deterministic(cfg),
        RandSpatialCropSamplesd(keys=(IMAGE, LABEL), roi_size=list(cfg.patch_size),
                                num_samples=cfg.samples_per_volume, random_size=False),
    ])


def infer_transforms(cfg: PipelineConfig) -> Compose:
    """Prediction pipeline for key "image" only: orientation, spacing and intensity as in training
    but no crop, so `monai.transforms.Invertd(transform=this, orig_keys="image")` maps outputs back
    to the input grid exactly."""
    keys = (IMAGE,)
    if cfg.intensity == "segresnet":
        intensity: list[MapTransform] = [
            NormalizeIntensityd(keys=IMAGE, nonzero=True),
            GaussianSmoothd(keys=IMAGE, sigma=SMOOTH_SIGMA),
            ScaleIntensityd(keys=IMAGE, minv=-1.0, maxv=1.0),
        ]
    else:
        low, high = cfg.hu_window
        intensity = [ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0,
                                          b_max=1.0, clip=True)]
    return Compose([
        LoadImaged(keys=IMAGE, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=AXIS_LABELS),
        Spacingd(keys=keys, pixdim=list(cfg.spacing), mode="bilinear"),
        *intensity,
        EnsureTyped(keys=keys, dtype=torch.float32),
    ])
