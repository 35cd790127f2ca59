"""The simulated user against hand-made volumes whose clicks are known: the first click nearest
the centre of the eroded structure, each next click in the largest eroded error (positive in a
miss, negative in a false positive), the same clicks for the same seed; and the click loop with an
oracle model (Dice 1 after one click), a model that returns nothing (Dice 0) and replayed
clicks."""

from __future__ import annotations

import numpy as np
import pytest

from ctseg.errors import ConfigError
from ctseg.evaluate.clicks import Click, error_regions, first_click, next_click
from ctseg.evaluate.interactive import simulate, structure_rng

SHAPE = (40, 40, 20)


def box(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    """A boolean volume of SHAPE, true on [lo, hi) per axis."""
    mask = np.zeros(SHAPE, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def test_first_click_is_the_voxel_nearest_the_centre_of_the_eroded_largest_part():
    # A 9 x 9 x 9 cube and a slab; eroded, the cube keeps 7 x 7 x 7 = 343 voxels and the slab
    # 11 x 26 x 2 = 572 (x 26..36, y 3..28, z 3..4): the slab is clicked, at its centre
    # (31, 15.5, 3.5), ties going to the first voxel in index order.
    truth = box((10, 10, 5), (19, 19, 14)) | box((25, 2, 2), (38, 30, 6))
    assert first_click(truth) == Click((31, 15, 3), 1)
    # A 1-voxel-thick sheet vanishes under 3 x 3 x 3 erosion: the sheet itself is clicked.
    sheet = box((5, 5, 7), (16, 16, 8))
    assert first_click(sheet) == Click((10, 10, 7), 1)


def test_first_click_weighs_distance_by_the_voxel_spacing():
    # An L: an arm along x (z 3..4 eroded) and one along z (x 11..12 eroded); the eroded L's
    # centre is (16.3, 11.5, 6.3), outside it. In voxels the x arm's (16, 11, 4) is nearest
    # (2.3 voxels off in z); at 5 mm slices that is 11.5 mm, and the z arm's (12, 11, 6) is
    # nearer (4.3 mm off in x, 1.5 mm in z).
    truth = box((10, 10, 2), (30, 14, 6)) | box((10, 10, 2), (14, 14, 18))
    assert first_click(truth) == Click((16, 11, 4), 1)
    assert first_click(truth, spacing=(1.0, 1.0, 5.0)) == Click((12, 11, 6), 1)


def test_next_click_is_positive_in_the_largest_miss():
    truth = box((5, 5, 5), (30, 30, 15))
    predicted = truth & ~box((5, 5, 5), (15, 15, 15))  # a 10 x 10 x 10 corner missed
    click = next_click(predicted, truth, np.random.default_rng(0), at="centre")
    assert click == Click((9, 9, 9), 1)  # the centre of the eroded miss (6..13 in x and y)
    random = next_click(predicted, truth, np.random.default_rng(0))
    missed, _ = error_regions(predicted, truth, (3, 3, 3))
    assert random.label == 1 and missed[random.point]


def test_next_click_is_negative_in_a_larger_false_positive():
    truth = box((5, 5, 5), (20, 20, 15))
    predicted = truth.copy()
    predicted[6:8, 6:8, 6:8] = False  # a small miss, gone under erosion
    predicted |= box((25, 25, 5), (35, 35, 15))  # a 10 x 10 x 10 false positive
    click = next_click(predicted, truth, np.random.default_rng(0))
    assert click.label == 0
    assert box((26, 26, 6), (34, 34, 14))[click.point]  # inside the eroded false positive
    assert not truth[click.point]


def test_next_click_tries_2d_erosion_then_stops():
    truth = box((5, 5, 5), (20, 20, 15))
    # A miss 2 voxels thick in z: 3-D erosion removes it, in-plane erosion keeps its inside.
    predicted = truth & ~box((5, 5, 9), (15, 15, 11))
    click = next_click(predicted, truth, np.random.default_rng(0), at="centre")
    assert click == Click((9, 9, 9), 1)
    assert next_click(truth, truth, np.random.default_rng(0)) is None


def test_the_same_seed_gives_the_same_clicks_and_another_seed_others():
    truth = box((5, 5, 5), (30, 30, 15))
    predicted = truth & ~box((5, 5, 5), (20, 20, 15))
    clicks = [next_click(predicted, truth, structure_rng(seed, "s0001", "liver"))
              for seed in (0, 0, 1)]
    assert clicks[0] == clicks[1] != clicks[2]
    assert next_click(predicted, truth, structure_rng(0, "s0002", "liver")) != clicks[0]


def test_an_oracle_scores_one_after_a_click_and_stops():
    truth = box((5, 5, 5), (30, 30, 15))
    seen: list[Click] = []

    def oracle(click: Click) -> np.ndarray:
        seen.append(click)
        return truth

    steps = simulate(oracle, truth, 5, np.random.default_rng(0))
    assert [s.dice for s in steps] == [1.0] * 5
    assert [s.number for s in steps] == [1, 2, 3, 4, 5]
    assert seen == [first_click(truth)]  # nothing left to correct: no second click
    assert all(s.click is None for s in steps[1:])


def test_a_model_that_returns_nothing_scores_zero_and_gets_positive_clicks():
    truth = box((5, 5, 5), (30, 30, 15))
    steps = simulate(lambda click: np.zeros(SHAPE, dtype=bool), truth, 4,
                     np.random.default_rng(0))
    assert [s.dice for s in steps] == [0.0] * 4
    assert [s.click.label for s in steps] == [1, 1, 1, 1]
    assert all(truth[s.click.point] for s in steps)


def test_dice_follows_the_model_and_replay_gives_its_clicks():
    truth = box((5, 5, 5), (25, 25, 15))
    outputs = iter([box((5, 5, 5), (15, 25, 15)), truth])  # half, then all
    steps = simulate(lambda click: next(outputs), truth, 3, np.random.default_rng(0))
    assert [round(s.dice, 4) for s in steps] == [round(2 / 3, 4), 1.0, 1.0]
    assert steps[1].click.label == 1 and steps[2].click is None
    replay = [Click((1, 1, 1), 1), Click((2, 2, 2), 0)]
    given: list[Click] = []
    simulate(lambda click: given.append(click) or truth, truth, 3, np.random.default_rng(0),
             replay=replay)
    assert given == replay


def test_a_budget_below_one_is_refused():
    with pytest.raises(ConfigError, match="clicks must be >= 1"):
        simulate(lambda click: click, box((1, 1, 1), (5, 5, 5)), 0, np.random.default_rng(0))
