"""Post-processing chosen on a cross-validation's out-of-fold predictions, by nnU-Net's rule:
keep only the largest connected component of a structure where that does not lower the
structure's mean out-of-fold Dice (`ctseg.inference.postprocess` applies it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ctseg.evaluate.metrics import dice
from ctseg.inference.postprocess import largest_component


def choose(cases: Iterable[tuple[np.ndarray, np.ndarray]], names: Sequence[str]
           ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The structures whose mean Dice over the (prediction, ground truth) `cases` is not lowered
    by keeping their largest component (over the cases that predict them), and both means of
    each structure tested. `cases` is consumed one at a time (an iterator keeps one case in
    memory)."""
    before: dict[int, list[float]] = {}
    after: dict[int, list[float]] = {}
    for pred, gt in cases:
        for index in (int(v) for v in np.unique(pred)):
            if not 0 < index < len(names):
                continue
            mask, truth = pred == index, gt == index
            before.setdefault(index, []).append(dice(mask, truth))
            after.setdefault(index, []).append(dice(largest_component(mask), truth))
    chosen, tested = [], {}
    for index in sorted(before):
        mean_before, mean_after = float(np.mean(before[index])), float(np.mean(after[index]))
        tested[names[index]] = {"dice": mean_before, "dice_largest_component": mean_after}
        if mean_after >= mean_before:
            chosen.append(names[index])
    return chosen, tested
