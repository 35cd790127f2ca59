"""Every VISTA3D prompt mode through predict on a CT longer than two windows along every axis: the
labels of a small random VISTA3D equal MONAI's inferers and VISTA3D post-processing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import blend_windows, save_checkpoint
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.inferers import SlidingWindowInferer
from monai.transforms.utils import keep_components_with_positive_points
from omegaconf import OmegaConf

from ctseg.data.transforms import IMAGE, PipelineConfig, infer_transforms
from ctseg.inference.runner import run
from ctseg.inference.vista3d import rounded_inside
from ctseg.labels import label_names
from ctseg.models.vista3d import VISTA3DModule
from ctseg.vista3d_labels import LAST_SUPPORTED

# A coarse model grid and small windows keep each prediction under a second on CPU.
SPACING, ROI, OVERLAP = 12.0, (8, 8, 8), 0.25
PIPELINE = {"version": "v1", "spacing": SPACING, "intensity": "hu_window", "smooth_sigma": 0.0,
            "patch_size": list(ROI)}
CLICK = (14, 10, 9)  # model-grid voxel, also the input voxel: the input is on the model grid
AWAY = (17, 13, 12)


@pytest.fixture(scope="module")
def small_vista3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[VISTA3DModule, Path]:
    """A random-weight VISTA3D (8 channels, 3 levels) for 8^3 windows and its checkpoint."""
    torch.manual_seed(0)
    module = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                           roi_size=ROI).eval()
    path = tmp_path_factory.mktemp("small_vista3d") / "vista3d.ckpt"
    save_checkpoint(module, path, PIPELINE)
    return module, path


@pytest.fixture(scope="module")
def tiled_ct(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, torch.Tensor]:
    """The shared CT at 12 mm, tiled 3x along z, cropped to (20, 18, 18); its model-grid image."""
    source = nib.load(shared_ct)
    ct = np.tile(np.asarray(source.dataobj)[::4, ::4, ::4], (1, 1, 3))[5:25, 4:22, 3:21]
    path = tmp_path_factory.mktemp("tiled") / "tiled.nii.gz"
    nib.save(nib.Nifti1Image(ct, source.affine @ np.diag([4.0, 4.0, 4.0, 1.0])), path)
    image = infer_transforms(PipelineConfig(**{k: v for k, v in PIPELINE.items()
                                               if k != "version"}))({IMAGE: str(path)})[IMAGE]
    assert image.shape[1:] == ct.shape
    assert all(s > 2 * r for s, r in zip(ct.shape, ROI, strict=True))  # > two windows
    return path, image[None].as_tensor()


def _predict(ckpt: Path, image: Path, out: Path, **prompt) -> np.ndarray:
    """predict's label map of `image` for `prompt`."""
    cfg = OmegaConf.create({
        "ckpt": str(ckpt), "input": str(image), "output": str(out), "device": "cpu",
        "progress": False, "masks": False, "prompt": prompt,
        "sw": {"overlap": OVERLAP, "batch_size": 2, "mode": "gaussian"},
    })
    assert run(cfg) == 0
    return np.asarray(nib.load(out / "tiled" / "labels.nii.gz").dataobj)


def _post(logits: torch.Tensor, ids: list[int]) -> np.ndarray:
    """VISTA3D ids of (P, D, H, W) logits by VistaPostTransformd (NaN, outside every window: 0)."""
    data = {"pred": logits.clone(), "label_prompt": torch.tensor(ids)}
    return VistaPostTransformd(keys="pred")(data)["pred"][0].nan_to_num(0).numpy()


def _grid_starts(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Starts of the windows MONAI's SlidingWindowInferer visits on an image of `shape`."""
    starts = []

    def record(windows: torch.Tensor, coords: list) -> torch.Tensor:
        starts.extend(tuple(s.start for s in c[2:]) for c in coords)
        return windows

    SlidingWindowInferer(ROI, overlap=OVERLAP, with_coord=True)(torch.zeros(1, 1, *shape), record)
    return starts


def _automatic(net: Callable, image: torch.Tensor, ids: list[int]) -> np.ndarray:
    """Class-prompt inference by MONAI's gaussian sliding window (ctseg's default blending) and
    VistaPostTransformd."""
    with torch.no_grad():
        logits = SlidingWindowInferer(ROI, overlap=OVERLAP, mode="gaussian",
                                      padding_mode="replicate")(
            image, lambda w: net(w, class_vector=torch.tensor(ids)[:, None], transpose=True))
    return _post(logits[0], ids)


@pytest.mark.parametrize(("labels", "ids"), [
    ([1, 3], [1, 3]),
    ([2], [5, 14]),  # kidney: its sub-classes
    (None, None),  # everything the checkpoint knows
])
def test_class_prompts_equal_monai_sliding_window(small_vista3d, tiled_ct, tmp_path, labels, ids):
    module, ckpt = small_vista3d
    path, image = tiled_ct
    ids = ids or sorted(module.prompt_ids.tolist())
    expected = _automatic(module.net, image, ids)
    assert len(np.unique(expected)) > min(len(ids), 5)
    ours = _predict(ckpt, path, tmp_path, labels=labels)
    assert np.array_equal(ours, expected), f"agreement {(ours == expected).mean():.5f}"


def _click_prompts(clicks: list, point_labels: list, label: int | None) -> dict:
    """VISTA3D's click arguments as the bundle's evaluator passes them (float64 clicks; a
    zero-shot id: prompt only)."""
    supported = label is not None and label <= LAST_SUPPORTED
    return {"point_coords": torch.tensor([clicks], dtype=torch.float64),
            "point_labels": torch.tensor([point_labels]),
            "class_vector": torch.tensor([[label]]) if supported else None,
            "prompt_class": None if label is None else torch.tensor([[label]])}


@pytest.mark.parametrize("label", [None, 1, 140])  # clicks alone, with liver, with a zero-shot id
@pytest.mark.parametrize("point_window", [True, False])
def test_clicks_equal_monai_point_inference(small_vista3d, tiled_ct, tmp_path, label,
                                            point_window):
    module, ckpt = small_vista3d
    path, image = tiled_ct
    # One positive click for the point windows (MONAI sums, not blends, overlapping click windows).
    clicks, point_labels = ([CLICK], [1]) if point_window else ([CLICK, AWAY], [1, 0])
    prompts = _click_prompts(clicks, point_labels, label)

    def predictor(window: torch.Tensor, patch_coords: list) -> torch.Tensor:
        return module.net(window, patch_coords=patch_coords, **prompts, transpose=True)

    with torch.no_grad():
        if point_window:
            logits = point_based_window_inferer(image, ROI, module.net, **prompts, transpose=True)
        elif label == 1:
            logits = SlidingWindowInferer(ROI, overlap=OVERLAP, mode="gaussian",
                                          with_coord=True)(image, predictor)
        else:  # only the windows a click is strictly inside (VISTA3D's update_point_to_patch)
            starts = [s for s in _grid_starts(image.shape[2:]) if any(all(
                a < c < a + r for c, a, r in zip(click, s, ROI, strict=True)) for click in clicks)]
            logits = blend_windows(image, predictor, starts, ROI)[None]
    if label is None:  # clicks alone: keep the components holding a positive click
        logits = keep_components_with_positive_points(
            logits, prompts["point_coords"], prompts["point_labels"])
    expected = _post(logits[0], [label or 1])
    assert 0 < (expected > 0).mean() < 0.5 and expected[CLICK] == (label or 1)
    ours = _predict(ckpt, path, tmp_path, labels=None if label is None else [label],
                    points=[list(c) for c in clicks], point_labels=point_labels,
                    point_window=point_window)
    assert np.array_equal(ours, expected), f"agreement {(ours == expected).mean():.5f}"


def test_a_click_with_an_id_rounding_past_a_windows_far_edge_is_left_out_of_it():
    """MONAI's VISTA3D keeps a click strictly inside a window (15.7 in a window of 16) and then,
    with a class id, reads the class logits at its rounded voxel (16): an IndexError. ctseg leaves
    such a click out of that window, and the window runs with the clicks it holds."""
    torch.manual_seed(0)
    net = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                        roi_size=(16, 16, 16)).net.eval()
    image = torch.randn(1, 1, 16, 16, 16)
    window = ((16, 32), (0, 16), (0, 16))  # the second window along x of a padded image
    coords = [(slice(None), slice(None), *(slice(a, b) for a, b in window))]
    points = torch.tensor([[31.7, 8.0, 8.0], [24.0, 8.0, 8.0], [40.0, 8.0, 8.0]])
    labels = torch.tensor([1, 0, 1])
    ids = {"class_vector": torch.tensor([[1]]), "prompt_class": torch.tensor([[1]])}
    with torch.no_grad(), pytest.raises(IndexError):
        net(image, point_coords=points[None], point_labels=labels[None], patch_coords=coords,
            transpose=True, **ids)
    inside, inside_labels = rounded_inside(points, labels, window)
    assert inside.tolist() == [[24.0, 8.0, 8.0]]  # 40 lies beyond the window: MONAI drops it too
    assert inside_labels.tolist() == [0]
    with torch.no_grad():
        out = net(image, point_coords=inside[None], point_labels=inside_labels[None],
                  patch_coords=coords, transpose=True, **ids)
    assert out.shape == (1, 1, 16, 16, 16) and torch.isfinite(out).all()
