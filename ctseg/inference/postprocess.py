"""Post-processing of predicted label maps: keep only the largest connected component of chosen
structures (MONAI's KeepLargestConnectedComponent, 26-connected as nnU-Net's). Which structures is
chosen on a cross-validation's out-of-fold predictions (`ctseg.evaluate.postprocess`) and written
as `postprocessing.json` beside each fold's checkpoints, where predict.py finds it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from ctseg.atomic import write_atomic
from ctseg.errors import ConfigError

POSTPROCESSING_FILE = "postprocessing.json"


def keep_largest(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """`labels` with every voxel of each of `classes` outside its largest 26-connected component
    set to background."""
    applied = sorted({int(c) for c in classes} & {int(v) for v in np.unique(labels)} - {0})
    if not applied:
        return labels
    keep = KeepLargestConnectedComponent(applied_labels=applied, is_onehot=False,
                                         independent=True, connectivity=labels.ndim)
    kept = keep(torch.from_numpy(labels.copy())[None])[0]  # a copy: MONAI edits in place
    return np.asarray(kept).astype(labels.dtype, copy=False)


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
