"""MONAI transform pipelines of ctseg: the wholeBody_ct_segmentation bundle's preprocessing.

Every pipeline is a deterministic prefix (load, orient, resample, intensity, foreground crop) that
MONAI's CacheDataset/PersistentDataset cache, followed, for training only, by random patches.

Intensity schemes (`PipelineConfig.intensity`):

- ``segresnet``: the bundle's configs/train.json — z-score over non-zero voxels, foreground crop
  (voxels > 0 after z-scoring, margin 10, size a multiple of the patch), Gaussian smoothing
  (`smooth_sigma`, 0.4 voxel by default), rescale to [-1, 1].
- ``hu_window``: VISTA3D style — clip Hounsfield units to `hu_window` and map them to [0, 1], then
  crop to voxels above the window's lower bound (> 0) with the same margin and divisibility.

Prediction steps (`PipelineConfig.predict_steps`): ``ctseg`` orients to RAS, resamples and scales
intensities, without a crop; ``vista3d_bundle`` follows the vista3d bundle's inference.json order:
resample, crop to voxels above 0 HU with a 10-voxel margin, scale intensities, orient to RAS (the
default for its bare `model.pt`). Both are inverted exactly by `monai.transforms.Invertd`.

The bundle smooths in training (train.json) but not in prediction (inference.json). ctseg keeps
the smoothing a setting of its own (`smooth_sigma`, 0 = off) that a checkpoint records, so a ctseg
model predicts with the preprocessing it was trained with, and a bundle `model.pt` with the
bundle's inference recipe (`smooth_sigma: 0.0` in conf/predict.yaml).

Patch samplers (`PipelineConfig.sampler`): ``random`` draws patch centres uniformly (the bundle's
RandSpatialCropd); ``classes`` first draws a class present in the volume (background included,
all classes equally likely), then a voxel of that class as the centre (MONAI's
RandCropByLabelClassesd, nnU-Net-style foreground oversampling), so small structures are seen as
often as large ones.
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
    CenterSpatialCropd,
    ClassesToIndicesd,
    Compose,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    GaussianSmoothd,
    Lambdad,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandSpatialCropSamplesd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ctseg.config import per_axis
from ctseg.sliding_window import label_dtype

INTENSITIES = ("segresnet", "hu_window")
SAMPLERS = ("random", "classes")
PREDICT_STEPS = ("ctseg", "vista3d_bundle")
# Bump when the deterministic transforms change, so disk caches of older tensors are not reused.
TRANSFORM_VERSION = "2"
IMAGE, LABEL = "image", "label"
# Key of a uint8 mask of the voxels that come from the image (1) rather than from the padding up to
# whole patches (0): evaluation scores the image only, as prediction does.
VALID = "valid"
# Key of the (num_classes,) bool flags of the classes a sample's dataset annotates (partial labels).
ANNOTATED = "annotated"
# Key of the name of a sample's dataset (its data.datasets entry, or its root folder).
DATASET = "dataset"
# Voxels added around the foreground box before rounding it up to a multiple of the patch size.
CROP_MARGIN = 10
# Nibabel's world axes (left->Right, posterior->Anterior, inferior->Superior), given explicitly.
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Gaussian smoothing of the bundle's training pipeline (train.json), in voxels, per scheme.
DEFAULT_SMOOTH_SIGMA = {"segresnet": 0.4, "hu_window": 0.0}
# The vista3d bundle's window (ScaleIntensityRanged a_min / a_max of its JSON): the Python default;
# conf/data/totalseg_v1.yaml writes the same values (tests/test_configs.py compares them).
HU_WINDOW = (-963.8247715525971, 1053.678477684517)
# Voxel indices kept per class for the `classes` sampler (bounds the cached index lists).
MAX_INDICES_PER_CLASS = 20_000
INDICES = f"{LABEL}_cls_indices"


@dataclass(frozen=True)
class PipelineConfig:
    """Preprocessing settings: voxel spacing (mm), intensity scheme, HU window, Gaussian smoothing
    (sigma in voxels; None: the scheme's default, 0: none), patch size, random patches per volume,
    patch sampler, class count (for the `classes` sampler) and the order of the prediction steps
    (`predict_steps`). Values are normalised on construction."""

    spacing: float | tuple[float, float, float] = 1.5
    intensity: str = "segresnet"
    hu_window: tuple[float, float] = HU_WINDOW
    patch_size: int | tuple[int, int, int] = (96, 96, 96)
    samples_per_volume: int = 1
    smooth_sigma: float | None = None
    sampler: str = "random"
    num_classes: int | None = None
    predict_steps: str = "ctseg"

    def __post_init__(self) -> None:
        """Validate every field and store spacing/patch_size as 3-tuples, hu_window as floats."""
        if self.intensity not in INTENSITIES:
            raise ValueError(f"unknown intensity scheme {self.intensity!r}; choose one of "
                             f"{', '.join(INTENSITIES)}")
        if self.predict_steps not in PREDICT_STEPS:
            raise ValueError(f"unknown predict_steps {self.predict_steps!r}; choose one of "
                             f"{', '.join(PREDICT_STEPS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown patch sampler {self.sampler!r}; choose one of "
                             f"{', '.join(SAMPLERS)}")
        if self.sampler == "classes" and not (self.num_classes or 0) >= 2:
            raise ValueError("the classes sampler needs num_classes >= 2 (background included), "
                             f"got {self.num_classes!r}")
        sigma = DEFAULT_SMOOTH_SIGMA[self.intensity] if self.smooth_sigma is None \
            else float(self.smooth_sigma)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"smooth_sigma must be >= 0 voxels (0: no smoothing), got "
                             f"{self.smooth_sigma!r}")
        object.__setattr__(self, "smooth_sigma", sigma)
        object.__setattr__(self, "spacing", per_axis(self.spacing, "spacing", float))
        object.__setattr__(self, "patch_size", per_axis(self.patch_size, "patch_size", int))
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
            "smooth_sigma": self.smooth_sigma,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _smoothing(cfg: PipelineConfig) -> list[MapTransform]:
    """Gaussian smoothing of the image when `cfg.smooth_sigma` > 0, else nothing."""
    return [GaussianSmoothd(keys=IMAGE, sigma=cfg.smooth_sigma)] if cfg.smooth_sigma else []


def _intensity(cfg: PipelineConfig, crop: Sequence[MapTransform]) -> list[MapTransform]:
    """Intensity scaling per scheme, with the `crop` steps (possibly none) where train.json has
    its foreground crop."""
    if cfg.intensity == "segresnet":
        return [
            NormalizeIntensityd(keys=IMAGE, nonzero=True),
            *crop,
            *_smoothing(cfg),
            ScaleIntensityd(keys=IMAGE, minv=-1.0, maxv=1.0),
        ]
    low, high = cfg.hu_window
    return [ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                                 clip=True), *crop, *_smoothing(cfg)]


def _ones(image: torch.Tensor) -> torch.Tensor:
    """A uint8 mask of ones in the shape of `image` (the `VALID` mask before any crop or pad)."""
    return torch.ones_like(image, dtype=torch.uint8)


def _deterministic(cfg: PipelineConfig, valid: bool = False) -> list[MapTransform]:
    """Load, orient to RAS, resample to `cfg.spacing`, scale intensities and crop; image+label,
    and with `valid` the `VALID` mask cropped and padded alongside."""
    keys = (IMAGE, LABEL)
    boxed = (*keys, VALID) if valid else keys
    return [
        LoadImaged(keys=IMAGE, image_only=True, dtype=np.float32),
        LoadImaged(keys=LABEL, image_only=True, dtype=np.uint8),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=AXIS_LABELS),
        Spacingd(keys=keys, pixdim=list(cfg.spacing), mode=("bilinear", "nearest")),
        *([CopyItemsd(keys=LABEL, names=VALID), Lambdad(keys=VALID, func=_ones)] if valid
          else []),
        *_intensity(cfg, [
            # allow_smaller=True: MONAI 1.4's default, which the bundle's train.json relies on.
            CropForegroundd(keys=boxed, source_key=IMAGE, margin=CROP_MARGIN,
                            k_divisible=list(cfg.patch_size), allow_smaller=True),
            SpatialPadd(keys=boxed, spatial_size=list(cfg.patch_size)),
        ]),
        EnsureTyped(keys=IMAGE, dtype=torch.float32),
        EnsureTyped(keys=LABEL, dtype=label_dtype(cfg.num_classes or 2)),  # unknown: smallest
        *([ClassesToIndicesd(keys=LABEL, num_classes=cfg.num_classes,
                             max_samples_per_class=MAX_INDICES_PER_CLASS)]
          if cfg.sampler == "classes" else []),
    ]


def volume_transforms(cfg: PipelineConfig) -> Compose:
    """The deterministic prefix on whole volumes (image and label, as training crops patches
    from them) with the `VALID` mask of the voxels that come from the image."""
    return Compose([*_deterministic(cfg, valid=True), DeleteItemsd(keys=INDICES)])


def eval_transforms(cfg: PipelineConfig,
                    center_crop: Sequence[int] | None = None) -> Compose:
    """Validation/test pipeline: the deterministic prefix on whole volumes (image and label)
    without the padding up to whole patches (the image's own voxels, as prediction sees them),
    or, as the bundle validates, the central `center_crop` region of the padded volume."""
    volume = volume_transforms(cfg).transforms
    if center_crop is not None:
        size = list(per_axis(center_crop, "center_crop", int))
        return Compose([*volume, CenterSpatialCropd(keys=(IMAGE, LABEL), roi_size=size),
                        DeleteItemsd(keys=VALID)])
    return Compose([*volume,
                    CropForegroundd(keys=(IMAGE, LABEL), source_key=VALID, allow_smaller=True),
                    DeleteItemsd(keys=VALID)])


def _patches(cfg: PipelineConfig) -> MapTransform:
    """The random patch sampler of `cfg`: uniform centres, or centres on a random class."""
    keys, size = (IMAGE, LABEL), list(cfg.patch_size)
    if cfg.sampler == "classes":
        return RandCropByLabelClassesd(keys=keys, label_key=LABEL, spatial_size=size,
                                       num_classes=cfg.num_classes,
                                       num_samples=cfg.samples_per_volume, indices_key=INDICES,
                                       allow_smaller=True, warn=False)
    return RandSpatialCropSamplesd(keys=keys, roi_size=size, num_samples=cfg.samples_per_volume,
                                   random_size=False)


def train_transforms(cfg: PipelineConfig) -> Compose:
    """Training pipeline: the deterministic prefix, then `samples_per_volume` random patches of
    `patch_size` per volume (a list per item; collate with monai's list_data_collate)."""
    return Compose([*_deterministic(cfg), _patches(cfg), DeleteItemsd(keys=INDICES)])


def infer_transforms(cfg: PipelineConfig) -> Compose:
    """Prediction pipeline for key "image" only, in the order of `cfg.predict_steps`: ctseg's
    (orientation, spacing, intensity and smoothing as in training, no crop) or the vista3d
    bundle's inference.json (spacing, foreground crop, intensity, orientation); either way
    `monai.transforms.Invertd(transform=this, orig_keys="image")` maps outputs back to the input
    grid exactly."""
    keys = (IMAGE,)
    orient = Orientationd(keys=keys, axcodes="RAS", labels=AXIS_LABELS)
    spacing = Spacingd(keys=keys, pixdim=list(cfg.spacing), mode="bilinear")
    if cfg.predict_steps == "vista3d_bundle":
        # inference.json's CropForegroundd: voxels above 0 HU, before any intensity scaling.
        crop = CropForegroundd(keys=keys, source_key=IMAGE, margin=CROP_MARGIN, allow_smaller=True)
        steps = [spacing, crop, *_intensity(cfg, crop=()), orient]
    else:
        steps = [orient, spacing, *_intensity(cfg, crop=())]
    return Compose([
        LoadImaged(keys=IMAGE, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys),
        *steps,
        EnsureTyped(keys=keys, dtype=torch.float32),
    ])
