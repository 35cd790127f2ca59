"""Memory-bounded sliding-window inference: blend windows slab by slab, reduce each to labels.

MONAI's `SlidingWindowInferer` stitches the full C x D x H x W logit volume before `argmax`.
Here the windows are visited in order of their start along one spatial axis (the slab axis) and
blended into a rolling accumulator that spans one window's extent along that axis. As soon as no
remaining window touches the leading planes, they are normalised by the summed importance map,
reduced to labels (and to the requested softmax channels) and dropped. Window grid, padding,
importance map and normalisation are MONAI's own, so the labels equal
`SlidingWindowInferer(...)(image, predictor).argmax(1)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.utils import (
    BlendMode,
    PytorchPadMode,
    convert_data_type,
    ensure_tuple_rep,
    fall_back_tuple,
    optional_import,
)

from ctseg.labels import label_map_dtype

tqdm, _ = optional_import("tqdm", name="tqdm")

log = logging.getLogger(__name__)

SPATIAL_DIMS = 3
# The window blends and image paddings the aggregation takes (MONAI's BlendMode and
# PytorchPadMode values).
BLEND_MODES = (BlendMode.GAUSSIAN.value, BlendMode.CONSTANT.value)
PAD_MODES = tuple(m.value for m in PytorchPadMode)
# Defaults of sliding-window inference, in training's validation / test and in predict.py alike
# (conf/sw/default.yaml holds the same values; a test checks they agree).
OVERLAP = 0.25
MODE = BlendMode.GAUSSIAN.value
BATCH_SIZE = 1

Predictor = Callable[..., torch.Tensor]
Window = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SlidingWindowResult:
    """Labels (D, H, W) and softmax volumes of the kept classes from `sliding_window_predict`."""

    labels: torch.Tensor
    probabilities: dict[int, torch.Tensor] = field(default_factory=dict)
    slab_axis: int = 0
    num_classes: int = 0
    num_windows: int = 0
    accumulator_shape: tuple[int, ...] = ()
    accumulator_bytes: int = 0


def label_dtype(num_classes: int) -> torch.dtype:
    """The torch dtype of label maps in memory: uint8 where the file type
    (`labels.label_map_dtype`) is uint8, int32 otherwise (torch's uint16 lacks most ops)."""
    return torch.uint8 if label_map_dtype(num_classes) == np.uint8 else torch.int32


def sliding_window_labels(
    image: torch.Tensor,
    predictor: Predictor,
    roi_size: Sequence[int] | int,
    overlap: Sequence[float] | float = 0.25,
    **kwargs: Any,
) -> torch.Tensor:
    """(D, H, W) label map equal to MONAI sliding-window inference + argmax, with bounded memory."""
    return sliding_window_predict(image, predictor, roi_size, overlap, **kwargs).labels


@torch.no_grad()
def sliding_window_predict(
    image: torch.Tensor,
    predictor: Predictor,
    roi_size: Sequence[int] | int,
    overlap: Sequence[float] | float = OVERLAP,
    mode: str = MODE,
    sigma_scale: Sequence[float] | float = 0.125,
    sw_batch_size: int = BATCH_SIZE,
    slab_axis: int | None = None,
    slab_planes: int | None = None,
    keep_channels: Sequence[int] = (),
    cval: float = 0.0,
    padding_mode: str = "constant",
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    accum_dtype: torch.dtype | None = None,
    progress: bool = False,
    window_starts: Sequence[Sequence[int]] | None = None,
    with_windows: bool = False,
) -> SlidingWindowResult:
    """Sliding-window inference of `image` (1, C_in, D, H, W) reduced slab by slab to labels.

    Args:
        image: (1, C_in, D, H, W) tensor (a MetaTensor is treated as a plain tensor).
        predictor: maps a (B, C_in, *roi_size) batch of windows to (B, C, *roi_size) logits.
            Its output tensor is weighted in place, as MONAI does.
        roi_size: window size; an int is used for every axis, non-positive entries take the image
            size (MONAI's `fall_back_tuple`).
        overlap: fraction in [0, 1) of overlap between windows, one value or one per axis.
        mode: "gaussian" or "constant" blending (`monai.data.utils.compute_importance_map`).
        sigma_scale: gaussian sigma as a fraction of the window size, one value or one per axis.
        sw_batch_size: windows per predictor call.
        slab_axis: spatial axis (0..2 or -3..-1) along which the volume is finished plane by plane;
            None picks the axis with the smallest accumulator (ties: the lowest index). Axis 0
            adds the windows in exactly MONAI's order, so the blended logits are bit-identical;
            other axes reorder the additions, which can flip only floating-point ties.
        slab_planes: planes of the accumulator along the slab axis (default: one window's
            extent, the least memory); the axis' whole extent makes it a full-volume accumulator
            that is reduced to labels once, after the last window (no rolling).
        keep_channels: class indices whose softmax (over all C classes) is returned as full
            (D, H, W) float32 volumes in `SlidingWindowResult.probabilities`.
        cval: constant used to pad an image smaller than `roi_size` (symmetric, like MONAI).
        padding_mode: "constant" (with `cval`), "replicate", "reflect" or "circular": how an image
            smaller than `roi_size` is padded, as MONAI's `padding_mode` (the wholeBody bundle's
            inference.json uses "replicate").
        sw_device: device of the windows passed to `predictor` (default: the image's device).
        device: device of the rolling accumulator (default: the image's device).
        output_device: device of the returned volumes (default: `device`).
        accum_dtype: dtype of the accumulator (default: the image's floating dtype, like MONAI;
            torch.float16 halves the accumulator on CUDA).
        progress: show a tqdm progress bar over predictor calls.
        window_starts: compute only the windows starting at these (D, H, W) voxels of the padded
            image instead of MONAI's grid (e.g. windows around clicks); voxels no window covers
            get label 0 and probability 0.
        with_windows: call `predictor(batch, windows)` with the batch's windows as
            ((start, stop), ...) per axis in padded-image voxels (prompted models need them).
    """
    image = _check_image(image)
    spatial = tuple(int(s) for s in image.shape[2:])
    roi = _check_roi(roi_size, spatial)
    overlaps = _check_overlap(overlap)
    blend = _check_mode(mode)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1 (a whole number), got {sw_batch_size!r}")
    if accum_dtype is None:
        accum_dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    if not accum_dtype.is_floating_point:
        raise ValueError(f"accum_dtype must be a floating dtype, got {accum_dtype}")
    keep = sorted(set(int(c) for c in keep_channels))
    if keep and keep[0] < 0:
        raise ValueError(f"keep_channels must be class indices >= 0, got {list(keep_channels)}")
    sw_device = torch.device(sw_device) if sw_device is not None else image.device
    device = torch.device(device) if device is not None else image.device
    output_device = torch.device(output_device) if output_device is not None else device

    image, pad = pad_to_roi(image, roi, cval, _check_padding(padding_mode))
    size = tuple(int(s) for s in image.shape[2:])
    axis = choose_axis(slab_axis, size, roi)
    if window_starts is None:
        windows = grid_windows(size, roi, overlaps)
    else:
        windows = _explicit_windows(window_starts, size, roi)
    # Explicit windows are blended inside their bounding box only (voxels outside get label 0).
    origin = tuple(min(w[d][0] for w in windows) for d in range(SPATIAL_DIMS))
    box = tuple(max(w[d][1] for w in windows) - o for d, o in enumerate(origin))
    windows.sort(key=lambda w: w[axis][0])  # stable: MONAI's order within one row of windows
    weight = compute_importance_map(
        roi, mode=blend, sigma_scale=sigma_scale, device=sw_device, dtype=accum_dtype
    )
    weight = weight.to(device=sw_device, dtype=accum_dtype)[None, None]
    rest = [d for d in range(SPATIAL_DIMS) if d != axis]
    slab_weight = weight[0].movedim(axis + 1, 1).to(device)

    if slab_planes is not None and slab_planes < 1:
        raise ValueError(f"slab_planes must be >= 1 or None, got {slab_planes}")
    planes = roi[axis] if slab_planes is None else min(max(slab_planes, roi[axis]), box[axis])
    stitch = _SlabStitcher(
        size=box,
        axis=axis,
        planes=planes,
        keep=keep,
        dtype=accum_dtype,
        device=device,
        output_device=output_device,
    )
    batches = range(0, len(windows), sw_batch_size)
    for first in tqdm(batches) if progress else batches:
        batch = windows[first : first + sw_batch_size]
        data = torch.cat([image[(slice(0, 1), slice(None), *_slices(w))] for w in batch])
        data = data.to(sw_device)
        output = predictor(data, batch) if with_windows else predictor(data)
        logits = _check_logits(output, len(batch), roi)
        logits *= weight
        for window, values in zip(batch, logits.to(device), strict=True):
            inside = tuple((a - o, b - o) for (a, b), o in zip(window, origin, strict=True))
            stitch.add(inside, values.movedim(axis + 1, 1), slab_weight, rest)
    stitch.finish()
    labels, probabilities = stitch.outputs(pad, spatial, origin, size)
    log.debug(
        "stitched %d windows along axis %d with accumulator %s",
        len(windows),
        axis,
        stitch.accumulator_shape,
    )
    return SlidingWindowResult(
        labels=labels,
        probabilities=probabilities,
        slab_axis=axis,
        num_classes=stitch.channels,
        num_windows=len(windows),
        accumulator_shape=stitch.accumulator_shape,
        accumulator_bytes=stitch.accumulator_bytes,
    )


class _SlabStitcher:
    """Rolling (C, planes, *rest) logit accumulator along the slab axis, flushed to labels when a
    window reaches past its last plane (planes = the whole extent: a full-volume accumulator)."""

    def __init__(
        self,
        size: tuple[int, ...],
        axis: int,
        planes: int,
        keep: list[int],
        dtype: torch.dtype,
        device: torch.device,
        output_device: torch.device,
    ) -> None:
        self.size, self.axis, self.planes, self.keep = size, axis, planes, keep
        self.dtype, self.device, self.output_device = dtype, device, output_device
        self.rest_size = tuple(s for d, s in enumerate(size) if d != axis)
        self.start = 0  # index along the slab axis of accumulator plane 0
        self.channels = 0
        self.values = torch.empty(0)
        self.weights = torch.empty(0)
        self.labels = torch.empty(0)
        self.probabilities: dict[int, torch.Tensor] = {}

    def _allocate(self, channels: int) -> None:
        """Create the accumulator and the output volumes once the number of classes is known."""
        if self.keep and self.keep[-1] >= channels:
            raise ValueError(
                f"keep_channels {self.keep} out of range for a predictor with {channels} classes"
            )
        self.channels = channels
        shape = (channels, self.planes, *self.rest_size)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.weights = torch.zeros(
            (1, self.planes, *self.rest_size), dtype=self.dtype, device=self.device
        )
        self.labels = torch.zeros(self.size, dtype=label_dtype(channels), device=self.output_device)
        self.probabilities = {
            c: torch.zeros(self.size, dtype=torch.float32, device=self.output_device)
            for c in self.keep
        }

    @property
    def accumulator_shape(self) -> tuple[int, ...]:
        """Shape (C, planes, *rest) of the rolling logit accumulator."""
        return tuple(self.values.shape)

    @property
    def accumulator_bytes(self) -> int:
        """Bytes held by the rolling logit and weight accumulators."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.weights))

    def add(
        self,
        window: tuple[tuple[int, int], ...],
        values: torch.Tensor,
        weight: torch.Tensor,
        rest: list[int],
    ) -> None:
        """Blend one weighted window, given as (C, planes, *rest), into the accumulator."""
        if not self.channels:
            self._allocate(values.shape[0])
        # Planes before the window's start are final (windows come in order of their start);
        # only as many as the window needs are flushed (with planes = the window's extent, all).
        self._flush(window[self.axis][1] - self.start - self.planes)
        first, last = (a - self.start for a in window[self.axis])
        region = (slice(None), slice(first, last), *(slice(*window[d]) for d in rest))
        self.values[region] += values
        self.weights[region] += weight

    def finish(self) -> None:
        """Flush the planes still open after the last window."""
        self._flush(self.size[self.axis] - self.start)

    def _flush(self, count: int) -> None:
        """Finish the next `count` planes (any number), at most one accumulator depth at a time."""
        while count > 0:
            chunk = min(count, self.planes)
            self._flush_planes(chunk)
            count -= chunk

    def _flush_planes(self, count: int) -> None:
        """Normalise the first `count` (<= planes) planes, reduce them to outputs, roll them out."""
        # Voxels outside every window (explicit windows only) have weight 0 and logits 0: label
        # 0 (the first maximum), and their probabilities are set to 0.
        covered = self.weights[0, :count] > 0
        weights = self.weights[:, :count].clamp_min(torch.finfo(self.dtype).tiny)
        logits = self.values[:, :count].div_(weights)
        done = slice(self.start, self.start + count)
        # max(...).indices is argmax (first maximum on ties) at about half the CPU time.
        self.labels.movedim(self.axis, 0)[done] = logits.max(0).indices.to(
            self.output_device, self.labels.dtype
        )
        if self.probabilities:
            norm = torch.logsumexp(logits, dim=0)
            for c, volume in self.probabilities.items():
                probability = torch.exp(logits[c] - norm).where(covered, 0.0)
                volume.movedim(self.axis, 0)[done] = probability.to(
                    self.output_device, torch.float32
                )
        self.start += count
        if self.start < self.size[self.axis]:  # the last flush leaves nothing to roll
            for buffer in (self.values, self.weights):
                _roll_planes(buffer.movedim(1, 0), count)

    def outputs(
        self,
        pad: list[tuple[int, int]],
        spatial: tuple[int, ...],
        origin: tuple[int, ...],
        full: tuple[int, ...],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Labels and kept probabilities placed at `origin` of the padded grid of size `full`
        (zeros around them), then cropped back from the padded grid to `spatial`."""
        labels, probabilities = self.labels, self.probabilities
        if self.size != full:
            region = tuple(slice(o, o + s) for o, s in zip(origin, self.size, strict=True))
            labels = _placed(labels, region, full)
            probabilities = {c: _placed(v, region, full) for c, v in probabilities.items()}
        if not any(before or after for before, after in pad):
            return labels, probabilities
        crop = tuple(slice(before, before + s) for (before, _), s in zip(pad, spatial, strict=True))
        return labels[crop].clone(), {c: v[crop].clone() for c, v in probabilities.items()}


def _placed(volume: torch.Tensor, region: tuple[slice, ...], size: tuple[int, ...]
            ) -> torch.Tensor:
    """A zero volume of `size` holding `volume` at `region`."""
    out = torch.zeros(size, dtype=volume.dtype, device=volume.device)
    out[region] = volume
    return out


def _roll_planes(buffer: torch.Tensor, count: int) -> None:
    """Move planes [count:] of `buffer` (a view, planes first) to the front in place and zero
    the freed tail."""
    keep = buffer.shape[0] - count
    for lo in range(0, keep, count):
        hi = min(lo + count, keep)
        buffer[lo:hi].copy_(buffer[lo + count : hi + count])
    buffer[max(keep, 0) :].zero_()


def grid_windows(size: Sequence[int], roi: Sequence[int], overlap: Sequence[float] | float
                 ) -> list[Window]:
    """MONAI's sliding-window grid over an image of `size` (at least `roi` on every axis), in
    MONAI's order, as ((start, stop), ...) per axis."""
    overlaps = _check_overlap(overlap)
    interval = tuple(int(r) if r == s else max(int(r * (1 - o)), 1)
                     for s, r, o in zip(size, roi, overlaps, strict=True))  # MONAI's scan interval
    return [tuple((int(a), int(b)) for a, b in w)
            for w in dense_patch_slices(tuple(size), tuple(roi), interval, return_slice=False)]


def _explicit_windows(starts: Sequence[Sequence[int]], size: tuple[int, ...],
                      roi: tuple[int, ...]) -> list[Window]:
    """Windows of `roi` at `starts`, each inside the padded image of `size`."""
    windows = []
    for start in starts:
        if len(start) != SPATIAL_DIMS or any(
                not 0 <= int(a) <= s - r for a, s, r in zip(start, size, roi, strict=True)):
            raise ValueError(f"window start {tuple(start)} does not fit a {roi} window into the "
                             f"image of {size}")
        windows.append(tuple((int(a), int(a) + r) for a, r in zip(start, roi, strict=True)))
    if not windows:
        raise ValueError("window_starts is empty: no window to compute")
    return windows


def _slices(window: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    """Spatial slices of one window given as (start, stop) pairs."""
    return tuple(slice(a, b) for a, b in window)


def _check_image(image: torch.Tensor) -> torch.Tensor:
    """Plain (1, C_in, D, H, W) tensor, or ValueError naming the shape received."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a (1, C_in, D, H, W) torch.Tensor, got {type(image)}")
    if image.ndim != 2 + SPATIAL_DIMS or image.shape[0] != 1:
        raise ValueError(
            f"image must have shape (1, C_in, D, H, W), got {tuple(image.shape)}; add batch and "
            "channel axes with image[None, None] or EnsureChannelFirst"
        )
    return convert_data_type(image, torch.Tensor)[0]


def _check_roi(roi_size: Sequence[int] | int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Window size with one entry per spatial axis (non-positive entries take the image size)."""
    if isinstance(roi_size, Sequence) and len(roi_size) != SPATIAL_DIMS:
        raise ValueError(
            f"roi_size must have {SPATIAL_DIMS} entries (D, H, W), got {tuple(roi_size)}"
        )
    return tuple(int(r) for r in fall_back_tuple(ensure_tuple_rep(roi_size, SPATIAL_DIMS), spatial))


def _check_overlap(overlap: Sequence[float] | float) -> tuple[float, ...]:
    """Overlap per spatial axis, each in [0, 1)."""
    if isinstance(overlap, Sequence) and len(overlap) != SPATIAL_DIMS:
        raise ValueError(f"overlap must be one value or {SPATIAL_DIMS} values, got {overlap}")
    overlaps = tuple(float(o) for o in ensure_tuple_rep(overlap, SPATIAL_DIMS))
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    return overlaps


def _check_mode(mode: str) -> BlendMode:
    """Blend mode "gaussian" or "constant"."""
    if str(mode) not in BLEND_MODES:
        raise ValueError(f"mode must be one of {sorted(BLEND_MODES)}, got {mode!r}")
    return BlendMode(str(mode))


def choose_axis(slab_axis: int | None, size: Sequence[int], roi: Sequence[int]) -> int:
    """Slab axis in 0..2; None picks the axis with the smallest accumulator roi[k] / size[k]."""
    if slab_axis is None:
        return min(range(SPATIAL_DIMS), key=lambda d: (roi[d] / size[d], d))
    if not -SPATIAL_DIMS <= slab_axis < SPATIAL_DIMS:
        raise ValueError(f"slab_axis must be in [-3, 2] or None, got {slab_axis}")
    return slab_axis % SPATIAL_DIMS


def _check_padding(padding_mode: str) -> str:
    """Padding mode among MONAI's (PyTorch's) pad modes."""
    if str(padding_mode) not in PAD_MODES:
        raise ValueError(f"padding_mode must be one of {list(PAD_MODES)}, got "
                         f"{padding_mode!r}")
    return str(padding_mode)


def pad_to_roi(
    image: torch.Tensor, roi: tuple[int, ...], cval: float, padding_mode: str = "constant"
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad axes shorter than `roi` symmetrically (`padding_mode`, `cval`), exactly as MONAI
    does."""
    pad = []
    for s, r in zip(image.shape[2:], roi, strict=True):
        diff = max(r - int(s), 0)
        pad.append((diff // 2, diff - diff // 2))
    if any(before or after for before, after in pad):
        flat = [p for before_after in reversed(pad) for p in before_after]
        image = F.pad(image, pad=flat, mode=padding_mode, value=cval)
    return image, pad


def _check_logits(logits: object, batch: int, roi: tuple[int, ...]) -> torch.Tensor:
    """Predictor output as a (B, C, *roi) tensor, or ValueError describing what came back."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"predictor must return one (B, C, *roi) tensor, got {type(logits).__name__}; "
            "wrap deep-supervision or dict outputs so they return the final logits only"
        )
    if logits.ndim != 2 + SPATIAL_DIMS or logits.shape[0] != batch or logits.shape[2:] != roi:
        raise ValueError(
            f"predictor returned shape {tuple(logits.shape)} for {batch} window(s) of {roi}; "
            f"expected ({batch}, C, {', '.join(map(str, roi))})"
        )
    return logits
