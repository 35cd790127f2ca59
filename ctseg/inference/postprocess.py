"""Post-processing of predicted label maps: keep only the largest connected component of chosen
structures (MONAI's largest-component mask, 26-connected as nnU-Net's). Which structures is
chosen on a cross-validation's out-of-fold predictions (`ctseg.evaluate.postprocess`) and written
as `postprocessing.json` beside each fold's checkpoints, where predict.py finds it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms.utils import get_largest_connected_component_mask

from ctseg.atomic import write_atomic
from ctseg.errors import ConfigError

POSTPROCESSING_FILE = "postprocessing.json"


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected (26-connected in 3D) component of a boolean mask (MONAI's
    get_largest_connected_component_mask)."""
    return np.asarray(get_largest_connected_component_mask(mask, connectivity=mask.ndim),
                      dtype=bool)


def keep_largest(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """`labels` with every voxel of each of `classes` outside its largest 26-connected component
    set to background (a new array; `labels` is left as it is)."""
    kept = labels.copy()
    for c in sorted({int(c) for c in classes} & {int(v) for v in np.unique(labels)} - {0}):
        mask = labels == c
        kept[mask & ~largest_component(mask)] = 0
    return kept


def write_choice(folder: Path, chosen: Sequence[str], tested: dict[str, Any]) -> Path:
    """Write the choice as `folder/postprocessing.json` (atomically)."""
    text = json.dumps({"largest_component": list(chosen), "out_of_fold_dice": tested}, indent=1)
    return write_atomic(folder / POSTPROCESSING_FILE, lambda tmp: tmp.write_text(text))


def read_choice(path: Path) -> list[str]:
    """The structures a `postprocessing.json` keeps the largest component of."""
    try:
        return [str(s) for s in json.loads(path.read_text())["largest_component"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a ctseg post-processing choice ({err}); run python -m "
                          "ctseg.evaluate cv=<multirun> again, or delete it") from err
