"""Cross-validation folds over the train + val subjects of a dataset, made as nnU-Net makes them
(its `splits_final.json`): subject ids sorted, shuffled by NumPy's RandomState(seed) and cut into K
consecutive parts, which is scikit-learn's KFold(shuffle=True, random_state=seed) that nnU-Net
calls with seed 12345. The test split never enters the pool."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctseg.atomic import write_atomic
from ctseg.errors import ConfigError

NNUNET_SEED = 12345
SPLITS_FILE = "splits_final.json"
Fold = dict[str, list[str]]


def make_folds(ids: Sequence[str], num_folds: int, seed: int = NNUNET_SEED) -> list[Fold]:
    """K folds of the unique `ids`: each a {"train": [...], "val": [...]} of sorted ids; the val
    parts are disjoint and cover the ids, the first len % K of them one id longer."""
    keys = sorted(set(ids))
    if num_folds < 2:
        raise ConfigError(f"data.num_folds={num_folds}: cross-validation needs >= 2 folds")
    if len(keys) < num_folds:
        raise ConfigError(f"data.num_folds={num_folds} needs at least {num_folds} subjects in the "
                          f"train + val pool, found {len(keys)}")
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, len(keys) // num_folds)
    sizes[: len(keys) % num_folds] += 1
    folds, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        folds.append({"train": [k for i, k in enumerate(keys) if i not in val],
                      "val": [k for i, k in enumerate(keys) if i in val]})
    return folds


def read_splits(path: str | Path) -> list[Fold]:
    """The folds of an nnU-Net `splits_final.json` (a list of {"train": [...], "val": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.splits_file={path}: no such file")
    try:
        folds = json.loads(path.read_text())
        parsed = [{"train": [str(i) for i in f["train"]], "val": [str(i) for i in f["val"]]}
                  for f in folds]
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"data.splits_file={path}: not an nnU-Net splits file (a JSON list of "
                          f'{{"train": [ids], "val": [ids]}}): {err}') from err
    if not parsed:
        raise ConfigError(f"data.splits_file={path}: holds no fold")
    for index, fold in enumerate(parsed):
        both = set(fold["train"]) & set(fold["val"])
        if both:
            raise ConfigError(f"data.splits_file={path}: fold {index} has {sorted(both)[0]} in "
                              "both train and val")
    return parsed


def write_splits(path: str | Path, folds: Sequence[Fold]) -> Path:
    """Write `folds` as an nnU-Net `splits_final.json` (atomically)."""
    text = json.dumps(list(folds), indent=1)
    return write_atomic(Path(path), lambda tmp: tmp.write_text(text))
