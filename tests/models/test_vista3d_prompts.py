"""VISTA3D training prompts: MONAI's sampler draw for draw, from a private generator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from monai.apps.vista3d.sampler import sample_prompt_pairs as monai_sample

from ctseg.models.vista3d_prompts import PromptSampling, _nth_outside, sample_prompt_pairs
from ctseg.vista3d_labels import vista3d_labels


def _patch() -> torch.Tensor:
    labels = torch.zeros(20, 18, 16, dtype=torch.long)
    labels[2:8, 3:9, 4:10] = 1
    labels[10:15, 2:6, 1:5] = 3
    labels[12:19, 10:17, 8:15] = 25  # hepatic vessel: a special class
    labels[0, 0, 0] = 57
    return labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("knobs", [
    {},
    {"max_prompt": 3, "max_backprompt": 2, "max_point": 8},
    {"max_foreprompt": 2, "drop_label_prob": 0.6, "drop_point_prob": 0.6},
])
def test_same_prompts_as_monai_given_the_same_seed(seed: int, knobs: dict):
    label_set = [1, 3, 5, 6, 25, 57, 100]
    sampling = PromptSampling(**knobs)
    kwargs = {k: getattr(sampling, k) for k in (
        "max_prompt", "max_foreprompt", "max_backprompt", "max_point", "drop_label_prob",
        "drop_point_prob")}
    random.seed(seed)
    expected = monai_sample(_patch()[None, None], label_set, **kwargs)
    ours = sample_prompt_pairs(_patch(), label_set, random.Random(seed), sampling,
                               vista3d_labels().special)
    for mine, theirs in zip((ours.label_prompt, ours.points, ours.point_labels,
                             ours.prompt_class), expected, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.equal(mine.float(), theirs.float())


def test_global_random_state_is_left_alone():
    random.seed(1)
    before = random.random()
    random.seed(1)
    sample_prompt_pairs(_patch(), [1, 3], random.Random(7))
    assert random.random() == before


def test_a_patch_without_foreground_gets_a_background_prompt():
    empty = torch.zeros(8, 8, 8, dtype=torch.long)
    p = sample_prompt_pairs(empty, [1, 3], random.Random(0), PromptSampling(max_backprompt=0))
    assert p.prompt_class.numel() == 1 and int(p.prompt_class) in (1, 3)
    assert p.point_labels is None or bool((p.point_labels == -1).all())


def test_points_of_special_classes_are_labelled_2_and_3():
    p = sample_prompt_pairs(_patch(), [25], random.Random(3),
                            PromptSampling(drop_label_prob=0, drop_point_prob=0),
                            special=vista3d_labels().special)
    assert set(p.point_labels.unique().tolist()) <= {-1, 2, 3} and 3 in p.point_labels
    inside = p.points[0][p.point_labels[0] == 3].long()
    assert bool((_patch()[tuple(inside.T)] == 25).all())


def test_nth_outside_equals_listing_the_background():
    rng = np.random.default_rng(0)
    mask = rng.random(500) < 0.3
    positive = np.flatnonzero(mask)
    picks = rng.integers(0, (~mask).sum(), 50)
    assert np.array_equal(_nth_outside(positive, picks), np.flatnonzero(~mask)[picks])
