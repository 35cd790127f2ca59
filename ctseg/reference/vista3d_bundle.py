"""The MONAI bundle *vista3d* inference pipeline, transcribed from its `configs/inference.json` and
the scripts it calls (`scripts/inferer.py` Vista3dInferer, `scripts/evaluator.py`
Vista3dEvaluator) with MONAI's own classes only: the reference that tests hold ctseg against.

Nothing here imports ctseg, and ctseg's own pipelines never import this module.

- preprocessing (its order): LoadImaged (image_only), EnsureChannelFirstd, EnsureTyped
  (track_meta), Spacingd bilinear to `resample_spacing` (1.5 mm), CropForegroundd (voxels > 0 HU,
  margin 10, allow_smaller), VistaPreTransformd (sub-classes 2, 20, 21 expanded; special clicks
  0/1 -> 2/3), ScaleIntensityRanged (-963.82..1053.68 HU -> 0..1, clipped), Orientationd RAS,
  CastToTyped float32.
- Vista3dEvaluator, user prompts, batch of one: no prompt at all means the 117
  `everything_labels`; label prompts become a (N, 1) class vector; clicks (voxel indices of the
  input file) go to the preprocessed grid through `inv(affine) @ original_affine`, unrounded
  (float64). AMP on CUDA.
- Vista3dInferer: ids above the point head's `last_supported` (132) are no class vector (zero-shot,
  clicks only); with clicks and `use_point_window`, `point_based_window_inferer` (one window
  centred on each click, zero padding, overlapping windows summed, NaN outside them); otherwise
  `SlidingWindowInfererAdapt(roi_size, sw_batch_size, with_coord=True)` -- built without the
  configured overlap, so MONAI's defaults: overlap 0.25, constant blending, zero padding. (That
  inferer does not hand its padding to the network while the windows run, so clicks on a volume
  thinner than a window stay unshifted on the padded grid.)
- postprocessing: VistaPostTransformd (argmax, background where no logit is above 0, channels
  to the prompted ids; clicks alone: components without a positive click removed), Invertd
  (nearest, the preprocessing's deep copy with reset ids, as the evaluator's `reset_ops_id`),
  NaN -> 255.

The bundle declares MONAI 1.4.0 (metadata.json). Where a MONAI default changed since then the
1.4 value is spelled out: Orientationd's `labels` were (("L", "R"), ("P", "A"), ("I", "S")).
Prompts are VISTA3D ids (the bundle's name look-up, `labels_dict`, is left out).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.apps.vista3d.transforms import VistaPostTransformd, VistaPreTransformd
from monai.inferers import SlidingWindowInfererAdapt
from monai.networks.nets.vista3d import VISTA3D, vista3d132
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    Lambdad,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    reset_ops_id,
)

RESAMPLE_SPACING = (1.5, 1.5, 1.5)
PATCH_SIZE = (128, 128, 128)
# inference.json's `inferer.overlap`; it reaches point_based_window_inferer only, which ignores it.
OVERLAP = 0.3
HU_WINDOW = (-963.8247715525971, 1053.678477684517)
CROP_MARGIN = 10
# Unsupported ids and the parents of sub-classes are left out of "everything".
EVERYTHING_LABELS = sorted(set(range(1, 133)) - {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129,
                                                  130, 131, 132})
SUBCLASS = {"2": [14, 5], "20": [28, 29, 30, 31, 32],
            "21": [*range(33, 57), *range(63, 98), 114, 120, 122]}
# Written where no window computed a logit (NaN), as inference.json's Lambdad.
NOT_COMPUTED = 255
MONAI_14_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def network(state_dict: Mapping[str, torch.Tensor] | None = None) -> VISTA3D:
    """inference.json `network_def`: `vista3d132(in_channels=1)`, its encoder width read from
    `state_dict` when given (48 for the bundle's model.pt; smaller ones make fast tests)."""
    stem = None if state_dict is None else state_dict["image_encoder.encoder.conv_init.weight"]
    width = 48 if stem is None else int(stem.shape[0])
    return vista3d132(encoder_embed_dim=width, in_channels=1)


def preprocessing(spacing: Sequence[float] = RESAMPLE_SPACING, device: str = "cpu") -> Compose:
    """inference.json `preprocessing_transforms`, in its order."""
    return Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys="image", device=torch.device(device), track_meta=True),
        Spacingd(keys="image", pixdim=list(spacing), mode="bilinear"),
        CropForegroundd(keys="image", allow_smaller=True, margin=CROP_MARGIN, source_key="image"),
        VistaPreTransformd(keys="image", subclass=SUBCLASS),
        ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0,
                             b_max=1, clip=True),
        Orientationd(keys="image", axcodes="RAS", labels=MONAI_14_AXIS_LABELS),
        CastToTyped(keys="image", dtype=torch.float32),
    ])


def postprocessing(preprocessing_: Compose) -> Compose:
    """inference.json `postprocessing` without its disabled ToDeviced and its SaveImaged."""
    return Compose([
        VistaPostTransformd(keys="pred"),
        Invertd(keys="pred", transform=copy.deepcopy(preprocessing_), orig_keys="image",
                nearest_interp=True, to_tensor=True),
        Lambdad(keys="pred", func=lambda x: torch.nan_to_num(x, nan=NOT_COMPUTED)),
    ])


def infer(inputs: torch.Tensor, net: VISTA3D, point_coords: torch.Tensor | None,
          point_labels: torch.Tensor | None, class_vector: torch.Tensor | None,
          use_point_window: bool = True, roi_size: Sequence[int] = PATCH_SIZE,
          overlap: float = OVERLAP, sw_batch_size: int = 1) -> torch.Tensor:
    """Vista3dInferer.__call__ without ground truth or a previous mask: (1, N, D, H, W) logits."""
    prompt_class = copy.deepcopy(class_vector)
    if class_vector is not None and torch.any(class_vector > net.point_head.last_supported):
        class_vector = None
    prompts = {"point_coords": point_coords, "point_labels": point_labels,
               "class_vector": class_vector, "prompt_class": prompt_class, "prev_mask": None,
               "labels": None, "label_set": None}
    if use_point_window and point_coords is not None:
        return point_based_window_inferer(
            inputs=inputs, roi_size=list(roi_size), sw_batch_size=sw_batch_size, transpose=True,
            with_coord=True, predictor=net, mode="gaussian", sw_device=inputs.device,
            device=inputs.device, overlap=overlap, **prompts)
    return SlidingWindowInfererAdapt(roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                     with_coord=True)(inputs, net, transpose=True, **prompts)


def transform_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Vista3dEvaluator.transform_points: (B, N, 3) voxel coordinates through `affine`."""
    bs, n = points.shape[:2]
    homogeneous = np.concatenate((points, np.ones((bs, n, 1))), axis=-1).reshape(bs * n, 4)
    return (affine @ homogeneous.T).T[:, :3].reshape(bs, n, 3)


@torch.no_grad()
def predict(image_path: str, state_dict: Mapping[str, torch.Tensor],
            spacing: Sequence[float] = RESAMPLE_SPACING, label_prompt: Sequence[int] | None = None,
            points: Sequence[Sequence[float]] | None = None,
            point_labels: Sequence[int] | None = None, use_point_window: bool = True,
            roi_size: Sequence[int] = PATCH_SIZE, device: str = "cpu") -> np.ndarray:
    """Labels (VISTA3D ids, 255 where nothing was computed) of one CT on its own grid, as the
    bundle's evaluator computes them for `input_dict` holding these prompts."""
    torch_device = torch.device(device)
    net = network(state_dict)
    net.load_state_dict(state_dict)
    net = net.to(torch_device).eval()
    item: dict = {"image": image_path}
    for key, value in (("label_prompt", label_prompt), ("points", points),
                       ("point_labels", point_labels)):
        if value is not None:
            item[key] = list(value)
    pre = preprocessing(spacing, device)
    data = pre(item)
    image = data["image"]
    inputs = image[None].to(torch_device)
    label_prompt, points, point_labels = (data.get(k) for k in ("label_prompt", "points",
                                                                 "point_labels"))
    if label_prompt is None and points is None:
        label_prompt = EVERYTHING_LABELS
    class_vector = (torch.as_tensor(label_prompt).to(torch_device).unsqueeze(-1)
                    if label_prompt is not None else None)
    coords = labels = None
    if points is not None:
        to_grid = np.linalg.inv(np.asarray(image.affine)) @ np.asarray(
            image.meta["original_affine"])
        coords = torch.from_numpy(transform_points(np.asarray([points], dtype=np.float64),
                                                   to_grid)).to(torch_device)
        labels = torch.as_tensor([point_labels]).to(torch_device)
    with torch.autocast("cuda", enabled=torch_device.type == "cuda"):
        pred = infer(inputs, net, coords, labels, class_vector, use_point_window, roi_size)
    out = {"image": reset_ops_id(image), "pred": pred[0], "label_prompt": class_vector,
           "points": coords, "point_labels": labels}
    out = postprocessing(pre)(out)
    return np.asarray(out["pred"].cpu())[0].astype(np.int64)
