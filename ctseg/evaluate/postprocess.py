"""Post-processing chosen on a cross-validation's out-of-fold predictions, by nnU-Net's rule:
keep only the largest connected component of a structure where that does not lower the
structure's mean out-of-fold Dice (`ctseg.inference.postprocess` applies it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ctseg.evaluate.metrics import dice
from ctseg.inference.postprocess import keep_largest


def choose(cases: Sequence[tuple[np.ndarray, np.ndarray]], names: Sequence[str]
           ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The structures whose mean Dice over the (prediction, ground truth) `cases` is not lowered
    by keeping their largest component (among those predicted at all), and both means of each
    structure tested."""
    chosen, tested = [], {}
    for index, name in enumerate(names):
        if index == 0:
            continue
        before, after = [], []
        for pred, gt in cases:
            if not (pred == index).any():
                continue
            kept = keep_largest(pred, [index])
            truth = gt == index
            before.append(dice(pred == index, truth))
            after.append(dice(kept == index, truth))
        finite = [(b, a) for b, a in zip(before, after, strict=True) if not math.isnan(b)]
        if not finite:
            continue
        mean_before = float(np.mean([b for b, _ in finite]))
        mean_after = float(np.mean([a for _, a in finite]))
        tested[name] = {"dice": mean_before, "dice_largest_component": mean_after}
        if mean_after >= mean_before:
            chosen.append(name)
    return chosen, tested
