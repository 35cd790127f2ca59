"""Training prompts for VISTA3D drawn from a label patch: class prompts and point clicks.

`sample_prompt_pairs` follows MONAI's `monai.apps.vista3d.sampler.sample_prompt_pairs` (the
bundle's sampler) draw for draw, with three differences: randomness comes from the `random.Random`
passed in, never the global state (seeded with the same value, both give the same prompts, which
a test checks); negative clicks are located without listing every background voxel (MONAI builds
a 3 x D*H*W index tensor per prompt); and a patch that would give no prompt at all (no foreground
and `max_backprompt=0`) gets one background prompt, so every training step has a loss.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PromptSampling:
    """The bundle's prompt knobs (train.json `hyper_kwargs`)."""

    max_prompt: int | None = None
    max_foreprompt: int | None = None
    max_backprompt: int | None = 1
    max_point: int = 5
    drop_label_prob: float = 0.25
    drop_point_prob: float = 0.25
    include_background: bool = False

    def __post_init__(self) -> None:
        """Refuse probabilities outside [0, 1] and non-positive point counts."""
        for name in ("drop_label_prob", "drop_point_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.max_point < 1:
            raise ValueError(f"max_point must be >= 1, got {self.max_point}")


@dataclass(frozen=True)
class Prompts:
    """Prompts for one image: P objects, N points each (the network's argument layout)."""

    label_prompt: Tensor | None  # (P, 1) class ids, None when class prompts were dropped
    points: Tensor | None  # (P, N, 3) voxel coordinates, None when points were dropped
    point_labels: Tensor | None  # (P, N): 0/1 negative/positive, 2/3 for special ids, -1 padding
    prompt_class: Tensor  # (P, 1) the class id each object stands for (the loss target)


def _nth_outside(positive: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Flat indices of the `picks`-th voxels (row-major) outside the sorted flat indices
    `positive`, i.e. `np.flatnonzero(~mask)[picks]` without building that array."""
    shifted = positive - np.arange(len(positive))
    return picks + np.searchsorted(shifted, picks, side="right")


def _choices(rng: random.Random, count: int, k: int) -> np.ndarray:
    """`k` indices in [0, count) drawn exactly as `rng.choices(range(count), k=k)` draws them."""
    n = float(count)
    return np.array([int(rng.random() * n) for _ in range(k)], dtype=np.int64)


def sample_prompt_pairs(
    labels: Tensor,
    label_set: Sequence[int],
    rng: random.Random,
    sampling: PromptSampling = PromptSampling(),
    special: Sequence[int] = (),
) -> Prompts:
    """Class and point prompts for one (D, H, W) label patch in VISTA3D ids.

    Foreground prompts are the ids of `label_set` present in the patch (0 only with
    `include_background`), background prompts ids of `label_set` absent from it (empty targets that
    teach the model to answer nothing). Each object gets up to `max_point` positive and negative
    clicks; with probability `drop_label_prob` the class prompts are dropped (points only), else
    with `drop_point_prob` the points are.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be one (D, H, W) patch, got shape {tuple(labels.shape)}")
    s = sampling
    device = labels.device
    present = labels.unique().cpu().numpy().tolist()
    unique_labels = list(set(present) - (set(present) - set(label_set)))
    if not s.include_background:
        unique_labels = list(set(unique_labels) - {0})
    background_labels = list(set(label_set) - set(unique_labels))
    if s.max_backprompt is not None and len(background_labels) > s.max_backprompt:
        rng.shuffle(background_labels)
        background_labels = background_labels[: s.max_backprompt]
    if s.max_foreprompt is not None and len(unique_labels) > s.max_foreprompt:
        rng.shuffle(unique_labels)
        unique_labels = unique_labels[: s.max_foreprompt]
    if s.max_prompt is not None and len(unique_labels) + len(background_labels) > s.max_prompt:
        if len(unique_labels) > s.max_prompt:
            unique_labels = rng.sample(unique_labels, s.max_prompt)
            background_labels = []
        else:
            background_labels = rng.sample(background_labels, s.max_prompt - len(unique_labels))
    if not unique_labels and not background_labels:
        candidates = sorted(set(label_set) - {0})
        if not candidates:
            raise ValueError(f"label_set {list(label_set)} has no class to prompt")
        background_labels = [rng.choice(candidates)]

    num_p = min(s.max_point, int(np.abs(rng.gauss(mu=0, sigma=s.max_point // 2))) + 1)
    num_n = min(s.max_point, int(np.abs(rng.gauss(mu=0, sigma=s.max_point // 2))))
    total = num_p + num_n
    shape = tuple(labels.shape)
    flat = labels.reshape(-1)
    points, point_labels = [], []
    for label in unique_labels:
        neg, pos = (2, 3) if label in special else (0, 1)
        inside = torch.nonzero(flat == int(label)).flatten().cpu().numpy()
        outside = flat.numel() - len(inside)
        num_pa, num_na = min(len(inside), num_p), min(outside, num_n)
        chosen = np.concatenate([inside[_choices(rng, len(inside), num_pa)],
                                 _nth_outside(inside, _choices(rng, outside, num_na))])
        coords = np.zeros((total, 3), dtype=np.int64)
        coords[: len(chosen)] = np.stack(np.unravel_index(chosen, shape), axis=-1)
        points.append(torch.from_numpy(coords))
        point_labels.append(torch.tensor([pos] * num_pa + [neg] * num_na
                                         + [-1] * (total - num_pa - num_na)))
    for _ in background_labels:
        points.append(torch.zeros(total, 3, dtype=torch.int64))
        point_labels.append(torch.full((total,), -1))

    label_prompt: Tensor | None = torch.tensor(unique_labels + background_labels).unsqueeze(-1)
    point: Tensor | None = torch.stack(points).float()
    point_label: Tensor | None = torch.stack(point_labels)
    prompt_class = copy.deepcopy(label_prompt)
    if rng.uniform(0, 1) < s.drop_label_prob and unique_labels:
        keep = len(unique_labels)
        label_prompt = None
        point, point_label = point[:keep], point_label[:keep]
        prompt_class = prompt_class[:keep]
    elif rng.uniform(0, 1) < s.drop_point_prob:
        point, point_label = None, None

    def move(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device)

    return Prompts(move(label_prompt), move(point), move(point_label), move(prompt_class))
