"""Checks of a download's files: the binary-mask check against numpy's sorted values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctseg.data.layout import DatasetError, check_binary, is_binary

CASES = [
    np.array([0, 1, 1, 0], np.uint8),
    np.array([0, 2], np.uint8),
    np.array([0, 0], np.uint16),
    np.array([0, 1, 255], np.uint8),
    np.array([0, 1, -1], np.int8),
    np.array([0, 1], np.int16),
    np.array([1, 1, 1], np.int32),
    np.array([0, 1, 2], np.int64),
    np.array([0.0, 1.0, -0.0], np.float32),
    np.array([0.0, 0.5], np.float32),
    np.array([0.0, np.nan], np.float64),
    np.array([1.0, np.inf], np.float64),
    np.array([True, False]),
    np.zeros((0, 3), np.float32),
]


@pytest.mark.parametrize("data", CASES, ids=lambda a: f"{a.dtype}:{a.tolist()}")
def test_is_binary_agrees_with_the_sorted_values(data: np.ndarray) -> None:
    assert is_binary(data) == bool(np.isin(np.unique(data), (0, 1)).all())
    assert is_binary(np.asfortranarray(data.reshape(-1, 1, 1))) == is_binary(data)


def test_check_binary_names_the_values_found() -> None:
    data = np.zeros((4, 4, 4), np.float32, order="F")
    data[1, 2, 3], data[0, 0, 1] = 0.5, 1
    with pytest.raises(DatasetError, match=r"mask\.nii\.gz: mask is not binary; values found: "
                                           r"0, 0\.5, 1$"):
        check_binary(data, Path("mask.nii.gz"))
    check_binary(np.ones((2, 2, 2), np.uint8), Path("mask.nii.gz"))
