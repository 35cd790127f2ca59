"""The MONAI bundle *wholeBody_ct_segmentation* recipes, transcribed from its configs with MONAI's
own classes only: the reference that tests and benchmarks hold ctseg against.

Nothing here imports ctseg, and ctseg's own pipelines never import this module: it is written
step by step from the bundle's `configs/inference.json` (prediction) and `configs/train.json`
(training and validation), so a difference between the two is a difference from the bundle.

- inference.json: LoadImaged, EnsureTyped, EnsureChannelFirstd, Orientationd RAS, Spacingd
  bilinear, NormalizeIntensityd (nonzero), ScaleIntensityd [-1, 1]; SlidingWindowInferer 96^3,
  overlap 0.25, gaussian, padding_mode replicate, AMP; Activationsd softmax, AsDiscreted argmax,
  Invertd (nearest). No Gaussian smoothing.
- train.json: LoadImaged, EnsureChannelFirstd, EnsureTyped, Orientationd RAS, Spacingd
  (bilinear, nearest), NormalizeIntensityd (nonzero), CropForegroundd (margin 10, k_divisible
  96), GaussianSmoothd (sigma 0.4), ScaleIntensityd [-1, 1], EnsureTyped; then RandSpatialCropd
  96^3. Validation: the same deterministic steps, then CenterSpatialCropd 160^3, and a
  SlidingWindowInferer 96^3, overlap 0.25 (MONAI's defaults: constant blending and padding).

The bundle declares MONAI 1.4.0 (metadata.json). Where a MONAI default changed since then the
1.4 value is spelled out: CropForegroundd's `allow_smaller` was True until MONAI 1.5, and
Orientationd's `labels` were (("L", "R"), ("P", "A"), ("I", "S")).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    GaussianSmoothd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandSpatialCropd,
    ScaleIntensityd,
    Spacingd,
)

# "pixdim" of the configs: highres (model.pt) and lowres (model_lowres.pt).
PIXDIM = {"highres": (1.5, 1.5, 1.5), "lowres": (3.0, 3.0, 3.0)}
ROI = (96, 96, 96)
NUM_CLASSES = 105
VAL_CROP = (160, 160, 160)
# Defaults of MONAI 1.4.0, the bundle's declared version, that later releases changed.
MONAI_14_ALLOW_SMALLER = True
MONAI_14_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def network(out_channels: int = NUM_CLASSES) -> SegResNet:
    """The bundle's `network_def`: SegResNet, 3-D, 1 channel, 32 filters, (1,2,2,4)/(1,1,1)."""
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=32,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2)


def inference_preprocessing(pixdim: tuple[float, float, float]) -> Compose:
    """inference.json `preprocessing` for key "image"."""
    return Compose([
        LoadImaged(keys="image"),
        EnsureTyped(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=MONAI_14_AXIS_LABELS),
        Spacingd(keys="image", pixdim=pixdim, mode="bilinear"),
        NormalizeIntensityd(keys="image", nonzero=True),
        ScaleIntensityd(keys="image", minv=-1.0, maxv=1.0),
    ])


def inference_inferer(sw_batch_size: int = 1, overlap: float = 0.25,
                      roi: tuple[int, ...] = ROI) -> SlidingWindowInferer:
    """inference.json `inferer` (its roi, overlap and window batch are the defaults)."""
    return SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap,
                                padding_mode="replicate", mode="gaussian")


def inference_postprocessing(preprocessing: Compose) -> Compose:
    """inference.json `postprocessing` without its SaveImaged: softmax, argmax, invert."""
    return Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys="pred", argmax=True),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True,
                to_tensor=True),
    ])


@torch.no_grad()
def predict(image_path: str, state_dict: Mapping[str, torch.Tensor], pixdim: tuple[float, ...],
            device: str = "cpu", sw_batch_size: int = 1) -> np.ndarray:
    """Labels of one CT on its own grid, as the bundle's evaluator computes them (AMP on CUDA,
    as `"amp": true` does; the evaluator's batch of one and decollation are spelled out)."""
    torch_device = torch.device(device)
    net = network(next(v for k, v in state_dict.items()
                       if k.startswith("conv_final.2.") and k.endswith("weight")).shape[0])
    net.load_state_dict(state_dict)
    net = net.to(torch_device).eval()
    preprocessing = inference_preprocessing(tuple(pixdim))
    data = preprocessing({"image": image_path})
    inferer = inference_inferer(sw_batch_size=sw_batch_size)
    with torch.autocast(torch_device.type, enabled=torch_device.type == "cuda"):
        data["pred"] = inferer(data["image"][None].to(torch_device), net)[0]
    data["pred"] = data["pred"].float().cpu()
    out = inference_postprocessing(preprocessing)(data)
    return np.asarray(out["pred"])[0].astype(np.int64)


def train_deterministic(pixdim: tuple[float, float, float], roi: tuple[int, ...] = ROI) -> list:
    """train.json `train#deterministic_transforms` for keys "image" and "label"."""
    keys = ["image", "label"]
    return [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=MONAI_14_AXIS_LABELS),
        Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear", "nearest"]),
        NormalizeIntensityd(keys="image", nonzero=True),
        CropForegroundd(keys=keys, source_key="image", margin=10, k_divisible=list(roi),
                        allow_smaller=MONAI_14_ALLOW_SMALLER),
        GaussianSmoothd(keys=["image"], sigma=0.4),
        ScaleIntensityd(keys="image", minv=-1.0, maxv=1.0),
        EnsureTyped(keys=keys),
    ]


def train_preprocessing(pixdim: tuple[float, float, float], roi: tuple[int, ...] = ROI
                        ) -> Compose:
    """train.json `train#preprocessing`: the deterministic steps, then one random patch."""
    return Compose([*train_deterministic(pixdim, roi),
                    RandSpatialCropd(keys=["image", "label"], roi_size=list(roi),
                                     random_size=False)])


def validate_preprocessing(pixdim: tuple[float, float, float], roi: tuple[int, ...] = ROI,
                           crop: tuple[int, ...] = VAL_CROP) -> Compose:
    """train.json `validate#preprocessing`: the deterministic steps, then a centre crop."""
    return Compose([*train_deterministic(pixdim, roi)[:-1],
                    CenterSpatialCropd(keys=["image", "label"], roi_size=list(crop))])


def validate_inferer() -> SlidingWindowInferer:
    """train.json `validate#inferer` (MONAI's default blending and padding: constant)."""
    return SlidingWindowInferer(roi_size=ROI, sw_batch_size=1, overlap=0.25)
