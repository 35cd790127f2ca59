"""Which split a record joins: the splits each stage reads, a seeded validation share of train,
and the train/val records of a cross-validation fold (the folds themselves: ctseg.data.folds)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ctseg.data.folds import Fold
from ctseg.data.records import SUBJECT
from ctseg.errors import ConfigError

# Splits each stage reads; the first one must be non-empty.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def check_val_fraction(fraction: float) -> None:
    """ValueError unless data.val_fraction is in [0, 1)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")


def split_validation(train: list[dict], fraction: float,
                     seed: int) -> tuple[list[dict], list[dict]]:
    """Move a seeded `fraction` of `train` (at least one when it has >= 2 and fraction > 0, never
    all of it) to validation; return (train, val)."""
    check_val_fraction(fraction)
    n_val = 0
    if fraction > 0 and len(train) >= 2:
        n_val = min(max(1, round(fraction * len(train))), len(train) - 1)
    chosen = set(random.Random(seed).sample(range(len(train)), n_val))
    return ([r for i, r in enumerate(train) if i not in chosen],
            [r for i, r in enumerate(train) if i in chosen])


def check_fold_settings(num_folds: int | None, fold: int | None, splits_file: str | None) -> None:
    """ConfigError unless the cross-validation keys fit together: data.fold with data.num_folds
    or data.splits_file (not both), or none of them."""
    if fold is None:
        if num_folds is not None or splits_file is not None:
            raise ConfigError("data.fold is not set: choose the fold to train (data.fold=0; all "
                              "of them: python train.py -m data.fold=0,1,2,3,4)")
        return
    if (num_folds is None) == (splits_file is None):
        raise ConfigError(f"data.fold={fold} needs data.num_folds=K (folds made from meta.csv) "
                          "or data.splits_file=<splits_final.json>, one of them")
    if fold < 0:
        raise ConfigError(f"data.fold={fold}: folds are numbered from 0")


def unique_ids(pool: Sequence[dict[str, Any]]) -> list[str]:
    """The subject ids of the train + val `pool`; ConfigError when one appears twice."""
    ids = [r[SUBJECT] for r in pool]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"data.fold: subject id {repeated[0]} appears in more than one data "
                          "root; cross-validation needs unique subject ids")
    return ids


def fold_records(pool: Sequence[dict[str, Any]], folds: Sequence[Fold], fold: int,
                 splits_file: str | None, roots: Sequence[str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and val records of fold `fold` of `folds` over the train + val `pool` (of `roots`);
    ConfigError when there is no such fold or it names a subject not in the pool."""
    if not 0 <= fold < len(folds):
        raise ConfigError(f"data.fold={fold}: choose 0..{len(folds) - 1}")
    chosen = folds[fold]
    unknown = sorted((set(chosen["train"]) | set(chosen["val"])) - {r[SUBJECT] for r in pool})
    if unknown:
        raise ConfigError(f"data.splits_file={splits_file}: subject {unknown[0]} of fold {fold} "
                          f"is not in the train + val pool of {', '.join(roots)}")
    by_id = {r[SUBJECT]: r for r in pool}
    return [by_id[i] for i in chosen["train"]], [by_id[i] for i in chosen["val"]]
