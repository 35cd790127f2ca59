"""The forgetting report's figures from per-class Dice before and after adding classes."""

from __future__ import annotations

import math

import pytest
import torch

from ctseg.callbacks.forgetting import forgetting_markdown, forgetting_rows, forgetting_summary

NAMES = ["background", "liver", "spleen", "aorta", "liver_tumour"]


def test_old_classes_with_ground_truth_are_compared_and_the_largest_drop_named():
    before = torch.tensor([0.99, 0.90, 0.80, math.nan, math.nan])
    after = torch.tensor([0.99, 0.88, 0.85, 0.70, 0.60])
    rows = forgetting_rows(NAMES, [1, 2, 3], before, after)
    assert [r["structure"] for r in rows] == ["liver", "spleen"]  # aorta: no Dice before
    summary = forgetting_summary(rows, ["liver_tumour"])
    assert summary["mean_before"] == pytest.approx(0.85)
    assert summary["mean_after"] == pytest.approx(0.865)
    assert summary["max_drop"] == pytest.approx(0.02)
    assert summary["max_drop_structure"] == "liver"
    table = forgetting_markdown(summary)
    assert table.startswith("Added liver_tumour; old classes' test Dice: mean 0.8500 before, "
                            "0.8650 after; largest drop 0.0200 (liver).")
    assert "| spleen | 0.8000 | 0.8500 | +0.0500 |" in table
    # no class got worse: no drop
    assert forgetting_summary(rows[1:], ["liver_tumour"])["max_drop"] == 0.0
    assert forgetting_markdown(forgetting_summary([], ["x"])).startswith("No old class")
