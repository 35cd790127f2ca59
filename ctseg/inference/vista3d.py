"""VISTA3D prediction of one case: clicks carried to the model grid, the window predictor of each
prompt mode, windows around the clicks, and the clicked-component post-processing.

Modes (as the bundle's inference.json, with ctseg's memory-bounded aggregation):
- class prompts / everything: one class-head channel per id and a constant 0 background channel;
  the argmax is VistaPostTransformd's (background where no logit is above 0);
- clicks with one supported id: class head and point head combined by the network's
  connected-component rule;
- clicks with a zero-shot id: point head only;
- clicks alone: point head only, then only the connected components that hold a positive click
  are kept (VistaPostTransformd's `keep_components_with_positive_points`).

Clicks reach the network unrounded (the bundle's evaluator carries them through the affines in
float64). With `point_window=false`, ctseg computes only the grid windows a click is inside and
shifts clicks by the padding of a volume thinner than a window; `bundle_grid` computes every
window as the bundle does (those without a click answer -9999, which suppresses the structure
where they overlap) and leaves the clicks unshifted, as MONAI's sliding window hands the network
its padding only after the windows.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from ctseg.errors import ConfigError
from ctseg.inference.prompts import CLICKED, Prompt, output_names, prompt_ids
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.vista3d import automatic_logits, with_background
from ctseg.sliding_window import Window, grid_windows
from ctseg.vista3d_labels import LAST_SUPPORTED, vista3d_labels

log = logging.getLogger(__name__)

# The networks whose untrained point head was warned about (warn once per loaded model, as
# `warnings`' "once" does; the set does not keep a network alive).
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class Vista3DPlan:
    """How to run one case: the predictor for the aggregator, the channel -> id table, the
    windows to compute (None: the whole grid) and the clicks (unpadded model grid) for
    post-processing."""

    predictor: Callable[..., Tensor]
    with_windows: bool
    channel_ids: list[int]
    names: dict[int, str]
    window_starts: list[tuple[int, int, int]] | None = None
    keep_clicked: tuple[Tensor, Tensor] | None = None


def to_model_grid(points: Sequence[Sequence[float]], input_affine: np.ndarray,
                  model_affine: np.ndarray, shape: Sequence[int]) -> Tensor:
    """Clicks in input-file voxel indices as (N, 3) float64 voxel coordinates of the preprocessed
    grid, unrounded (through world coordinates: orientation, resampling and crop carried), moved
    inside `shape`."""
    homogeneous = np.c_[np.asarray(points, dtype=np.float64), np.ones(len(points))]
    grid = (np.linalg.inv(model_affine) @ input_affine @ homogeneous.T).T[:, :3]
    grid = np.clip(grid, 0, np.asarray(shape) - 1)
    return torch.as_tensor(grid, dtype=torch.float64)


def click_windows(points: Tensor, size: Sequence[int], roi: Sequence[int]
                  ) -> list[tuple[int, int, int]]:
    """Start of a `roi` window centred on each click (its voxel: coordinates truncated), moved
    inside an image of `size` (MONAI's `point_based_window_inferer` placement), without
    repeats."""
    starts = []
    for point in points.tolist():
        start = tuple(int(min(max(int(p) - r // 2, 0), s - r))
                      for p, r, s in zip(point, roi, size, strict=True))
        if start not in starts:
            starts.append(start)
    return starts


def keep_clicked_components(labels: Tensor, points: Tensor, point_labels: Tensor) -> Tensor:
    """`labels` (D, H, W) with only the 26-connected foreground components that hold a positive
    click (at its rounded coordinates)."""
    mask = (labels > 0).cpu().numpy()
    # Components are found inside the foreground's bounding box only (the rest is background).
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    if not spans[0].size:
        return labels
    box = tuple(slice(int(span[0]), int(span[-1]) + 1) for span in spans)
    components, _ = ndimage.label(mask[box], structure=np.ones((3, 3, 3)))
    starts = np.array([b.start for b in box])
    stops = np.array([b.stop for b in box])
    positive = [p for p in torch.round(points[point_labels > 0]).long().tolist()
                if np.all(starts <= p) and np.all(np.array(p) < stops)]
    keep = {int(components[tuple(np.array(p) - starts)]) for p in positive} - {0}
    kept = torch.from_numpy(np.isin(components, sorted(keep))).to(labels.device)
    result = torch.zeros_like(labels)
    result[box] = torch.where(kept, labels[box], result[box])
    return result


def window_coverage(starts: Sequence[Sequence[int]] | None, size: Sequence[int],
                    roi: Sequence[int]) -> Tensor | None:
    """Voxels of an image of `size` inside a window of `roi` at one of `starts` (None: all)."""
    if starts is None:
        return None
    covered = torch.zeros(tuple(size), dtype=torch.bool)
    for start in starts:
        covered[tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))] = True
    return covered


def plan_case(net: torch.nn.Module, prompt: Prompt, known: Sequence[int],
              grid_points: Tensor | None, pad_before: Tensor, padded_size: Sequence[int],
              roi: Sequence[int], overlap: float) -> Vista3DPlan:
    """The prediction plan of `prompt` for a case whose clicks are at `grid_points` (model grid,
    before the padding of `pad_before` voxels per axis) on a padded grid of `padded_size`."""
    if not prompt.has_points:
        ids = prompt_ids(prompt, known)
        class_ids = torch.tensor(ids)

        def automatic(windows: Tensor) -> Tensor:
            return automatic_logits(net, windows, class_ids.to(windows.device))

        return Vista3DPlan(automatic, False, [0, *ids], output_names(ids))

    if grid_points is None:
        raise ValueError("a prompt with clicks needs their model-grid coordinates")
    table = vista3d_labels()
    label = prompt.label
    special = table.special if prompt.special_ids is None else prompt.special_ids
    point_labels = torch.tensor(prompt.point_labels)
    if label is not None and label in special:
        point_labels = point_labels + 2
    class_vector = None if label is None or label > LAST_SUPPORTED else torch.tensor([[label]])
    prompt_class = None if label is None else torch.tensor([[label]])
    value = CLICKED if label is None else label
    bundle_grid = prompt.bundle_grid and not prompt.point_window
    points = grid_points if bundle_grid else grid_points + pad_before

    def clicked(windows: Tensor, batch: list[Window]) -> Tensor:
        outputs = []
        for image, window in zip(windows, batch, strict=True):
            coords = [(slice(None), slice(None), *(slice(a, b) for a, b in window))]
            device = image.device
            inside, inside_labels = points, point_labels
            if class_vector is not None:
                inside, inside_labels = rounded_inside(points, point_labels, window)
            out = net(image[None], point_coords=inside[None].to(device),
                      point_labels=inside_labels[None].to(device),
                      class_vector=None if class_vector is None else class_vector.to(device),
                      prompt_class=None if prompt_class is None else prompt_class.to(device),
                      patch_coords=coords, transpose=True)
            outputs.append(out)
        return with_background(torch.cat(outputs))

    starts = None
    if prompt.point_window:
        starts = click_windows(points, padded_size, roi)
    elif class_vector is None and not bundle_grid:
        grid = [tuple(a for a, _ in w) for w in grid_windows(padded_size, roi, overlap)]
        starts = [s for s in grid if any(_inside(p, s, roi) for p in points.tolist())]
    keep = (grid_points, torch.tensor(prompt.point_labels)) if label is None else None
    return Vista3DPlan(clicked, True, [0, value],
                       output_names([value], clicked=label is None), starts, keep)


def plan_exported(runner: Callable[[Tensor], Tensor], prompt: Prompt, known: Sequence[int]
                  ) -> Vista3DPlan:
    """The plan of a class prompt (or everything) run by an export of the automatic mode, whose
    channels are background then `known` ids: the prompted ids' channels are picked."""
    ids = prompt_ids(prompt, known)
    missing = sorted(set(ids) - set(known))
    if missing:
        raise ConfigError(f"prompt.labels: ids {missing} are not in this export, which holds "
                          f"{list(known)}; export a checkpoint trained on them or use "
                          "backend=torch")
    channels = torch.tensor([0, *(list(known).index(i) + 1 for i in ids)])

    def automatic(windows: Tensor) -> Tensor:
        return runner(windows)[:, channels.to(windows.device)]

    return Vista3DPlan(automatic, False, [0, *ids], output_names(ids))


def rounded_inside(points: Tensor, labels: Tensor, window: Window) -> tuple[Tensor, Tensor]:
    """The clicks (N, 3) and labels (N,) whose rounded voxel lies inside `window`. MONAI's
    `connected_components_combine` (clicks with a class id) reads the class head's logits at the
    rounded voxel of each click `update_point_to_patch` kept (those strictly inside the window);
    a click within half a voxel of the window's far edge rounds onto the voxel after it, an
    IndexError there, so such a click is left out of this window (the window centred on it, or
    the next one of the grid, holds it)."""
    start = np.array([a for a, _ in window], dtype=np.float64)
    size = np.array([b - a for a, b in window])
    keep = torch.from_numpy((np.round(points.double().numpy() - start) < size).all(axis=1))
    return points[keep], labels[keep]


def _inside(point: Sequence[float], start: Sequence[int], roi: Sequence[int]) -> bool:
    """Whether a click is inside the window at `start` as VISTA3D's point head sees it (strictly
    after the window's first voxel)."""
    return all(s < p < s + r for p, s, r in zip(point, start, roi, strict=True))


def warn_untrained_clicks(model: LoadedModel, source: object) -> None:
    """Log a warning, once per loaded network, when `model` (loaded from `source`) records that
    no training step held clicks: its point head is untrained, and clicks give near-random
    masks."""
    if model.click_steps == 0 and (model.net is None or model.net not in _WARNED):
        if model.net is not None:
            _WARNED.add(model.net)
        log.warning("%s: this VISTA3D checkpoint was trained without clicks (0 training steps "
                    "with point prompts, e.g. experiment=vista3d_quick trains the automatic "
                    "branch only), so its point head is untrained and clicks give unreliable "
                    "masks; use class prompts (prompt.labels) or train the point head "
                    "(model.drop_point_prob < 1, model.stages)", source)
