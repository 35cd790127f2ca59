"""Where a prediction on a GPU keeps its sliding-window accumulator and how many windows it runs
per forward pass, planned from the free device memory (`plan_placement`, a pure function)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ctseg.errors import ConfigError
from ctseg.sliding_window import BATCH_SIZE, choose_axis

log = logging.getLogger(__name__)

AUTO = "auto"
# Share of the free device memory a plan may use; the rest absorbs the allocator's
# fragmentation, cuDNN workspaces and the preprocessing of the next case.
MEMORY_FRACTION = 0.8
# Largest number of windows per forward pass sw.batch_size=auto chooses (more hardly speeds up
# a large GPU and delays the first results).
MAX_AUTO_BATCH = 8
# Bytes per voxel of the flush of accumulator planes to labels besides the planes themselves:
# the maxima (accumulator dtype), their int64 indices and the covered mask (bool).
FLUSH_INDEX_BYTES = 8 + 1
LOGIT_BYTES = 4  # window logits are float32 once they leave the network
MIB = 2**20


@dataclass(frozen=True)
class Placement:
    """A plan: accumulator over the full volume or in rolling slabs, on which device, with how
    many planes (None: one window's extent), and windows per forward pass."""

    full_volume: bool
    device: torch.device
    slab_planes: int | None
    batch_size: int
    accumulator_bytes: int
    window_bytes: int
    free_bytes: int

    def describe(self) -> str:
        """One line saying what the plan chose and why it fits."""
        where = "full-volume" if self.full_volume else "rolling-slab"
        return (f"{where} accumulator on {self.device} ({self.accumulator_bytes / MIB:.0f} MiB, "
                f"{self.free_bytes / MIB:.0f} MiB free), {self.batch_size} window(s) per pass "
                f"({self.window_bytes / MIB:.0f} MiB each)")


def accumulator_bytes(size: Sequence[int], num_classes: int, planes: int, axis: int,
                      dtype: torch.dtype, probabilities: bool = False) -> int:
    """Device bytes of a (C + 1, planes, *rest) accumulator and of reducing it to labels (with
    the softmax's C-channel temporary when probabilities are kept)."""
    rest = math.prod(s for d, s in enumerate(size) if d != axis)
    voxels = planes * rest
    element = torch.empty((), dtype=dtype).element_size()
    total = (num_classes + 1) * voxels * element + voxels * (element + FLUSH_INDEX_BYTES)
    if probabilities:
        total += num_classes * voxels * element
    return total


def window_cost(forward_bytes: int, num_classes: int, roi: Sequence[int]) -> int:
    """Device bytes one window of a batch needs: its forward pass plus its float32 logits."""
    return forward_bytes + num_classes * math.prod(roi) * LOGIT_BYTES


def plan_placement(
    free_bytes: int,
    size: Sequence[int],
    num_classes: int,
    roi: Sequence[int],
    accum_dtype: torch.dtype,
    forward_bytes: int,
    batch_size: int | str,
    device: torch.device,
    slab_axis: int | None = None,
    probabilities: bool = False,
    max_batch: int = MAX_AUTO_BATCH,
) -> Placement:
    """The placement for a padded volume of `size` on CUDA `device` with `free_bytes` free:
    the full-volume accumulator when it fits beside the windows, else rolling slabs on the
    device, else rolling slabs in host memory; `batch_size` "auto" takes as many windows as the
    rest of the budget holds (1..`max_batch`). ConfigError when not even the windows fit."""
    budget = int(free_bytes * MEMORY_FRACTION)
    window = window_cost(forward_bytes, num_classes, roi)
    auto = batch_size == AUTO
    least = 1 if auto else int(batch_size)
    if least * window > budget:
        what = "one window" if auto or least == 1 else f"sw.batch_size={least} windows"
        fix = ("set sw.batch_size=auto or a smaller number, " if least > 1 else "") + \
            "free GPU memory, use a smaller sw.roi_size or predict with device=cpu"
        raise ConfigError(f"{what} of {tuple(roi)} need(s) {least * window / MIB:.0f} MiB on "
                          f"{device}, but only {budget / MIB:.0f} MiB of its "
                          f"{free_bytes / MIB:.0f} MiB free may be used; {fix}")
    axis = choose_axis(slab_axis, size, roi)
    options = (  # (full volume, planes, accumulator device bytes)
        (True, int(size[axis]), accumulator_bytes(size, num_classes, int(size[axis]), axis,
                                                  accum_dtype, probabilities)),
        (False, None, accumulator_bytes(size, num_classes, int(roi[axis]), axis, accum_dtype,
                                        probabilities)),
    )
    for full, planes, held in options:
        if held + least * window <= budget:
            batch = min(max(1, (budget - held) // window), max_batch) if auto else least
            return Placement(full, device, planes, batch, held, window, free_bytes)
    held = accumulator_bytes(size, num_classes, int(roi[axis]), axis, accum_dtype, probabilities)
    batch = min(max(1, budget // window), max_batch) if auto else least
    return Placement(False, torch.device("cpu"), None, batch, held, window, free_bytes)


def fixed_placement(device: torch.device, batch_size: int | str) -> Placement:
    """The placement without planning (CPU, VISTA3D): rolling slabs on `device` and
    `batch_size` windows per pass (auto: BATCH_SIZE)."""
    batch = BATCH_SIZE if batch_size == AUTO else int(batch_size)
    return Placement(False, device, None, batch, 0, 0, 0)


def free_memory(device: torch.device) -> int:
    """Free bytes on CUDA `device` (as the driver reports them, plus what torch's caching
    allocator holds unused)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def forward_bytes(predictor: Callable[[torch.Tensor], torch.Tensor], window: torch.Tensor,
                  device: torch.device) -> int:
    """Peak device bytes one forward pass of `window` adds (measured once, on `device`)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        predictor(window.to(device))
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)
