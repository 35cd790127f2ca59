"""Cross-validation folds: nnU-Net's splits (scikit-learn's KFold as nnU-Net calls it), disjoint
and covering the train + val pool, the test split untouched, the same in another process, and an
nnU-Net splits file read back into the same records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from sklearn.model_selection import KFold

from ctseg.data.datamodule import SegmentationDataModule
from ctseg.data.folds import NNUNET_SEED, make_folds, read_splits, write_splits
from ctseg.data.phantoms import write_phantoms
from ctseg.errors import ConfigError

FAST = {"spacing": 3.0, "patch_size": 32, "num_workers": 0, "prepare_workers": 1,
        "cache": "none"}
IDS = [f"s{i:04d}" for i in (7, 3, 12, 1, 9, 4, 11, 2, 8, 5, 10, 6, 13)]


def nnunet_splits(ids: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net v2's generate_crossval_split, as written in nnunetv2/utilities/crossval_split.py."""
    splits = []
    kfold = KFold(n_splits=k, shuffle=True, random_state=seed)
    keys = np.sort(ids)
    for train_idx, test_idx in kfold.split(keys):
        splits.append({"train": list(keys[train_idx]), "val": list(keys[test_idx])})
    return splits


@pytest.mark.parametrize(("k", "seed"), [(5, NNUNET_SEED), (3, 0), (13, 7)])
def test_folds_are_nnunets(k: int, seed: int) -> None:
    folds = make_folds(IDS, k, seed)
    assert folds == nnunet_splits(IDS, k, seed)
    vals = [i for f in folds for i in f["val"]]
    assert sorted(vals) == sorted(IDS) and len(vals) == len(set(vals))  # disjoint, covering
    for fold in folds:
        assert sorted(fold["train"] + fold["val"]) == sorted(IDS)
    assert make_folds(list(reversed(IDS)), k, seed) == folds  # the input order does not matter


def test_folds_are_the_same_in_another_process() -> None:
    code = ("import json, sys; from ctseg.data.folds import make_folds; "
            f"print(json.dumps(make_folds({IDS!r}, 5)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert json.loads(out) == make_folds(IDS, 5)


def test_a_splits_file_round_trips(tmp_path: Path) -> None:
    folds = make_folds(IDS, 5)
    path = write_splits(tmp_path / "splits_final.json", folds)
    assert read_splits(path) == folds
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["b"]}]))
    with pytest.raises(ConfigError, match="fold 0 has b in both train and val"):
        read_splits(path)
    path.write_text('{"train": []}')
    with pytest.raises(ConfigError, match="not an nnU-Net splits file"):
        read_splits(path)


@pytest.fixture(scope="module")
def pool_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small phantoms (their meta.csv splits: train, val and test)."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, 8, seed=3, shape=(32, 32, 24))
    return root


def module(root: Path, tmp_path: Path, **kwargs) -> SegmentationDataModule:
    """A fast DataModule over `root` whose prepared labels live in tmp_path."""
    return SegmentationDataModule(root=str(root), prepared_dir=str(tmp_path / "prepared"),
                                      **FAST, **kwargs)


def subjects(dm: SegmentationDataModule, split: str) -> list[str]:
    """The subject ids of `split` after setup."""
    return sorted(r["subject"] for r in dm.records[split])


def test_folds_split_the_train_and_val_pool_and_never_touch_test(pool_root, tmp_path) -> None:
    plain = module(pool_root, tmp_path)
    plain.setup("fit")
    plain.setup("test")
    pool = sorted(subjects(plain, "train") + subjects(plain, "val"))
    seen = []
    for fold in range(3):
        dm = module(pool_root, tmp_path, num_folds=3, fold=fold)
        dm.setup("fit")
        dm.setup("test")
        assert sorted(subjects(dm, "train") + subjects(dm, "val")) == pool
        assert not set(subjects(dm, "train")) & set(subjects(dm, "val"))
        assert subjects(dm, "test") == subjects(plain, "test")
        assert dm.folds == make_folds(pool, 3)
        seen += subjects(dm, "val")
    assert sorted(seen) == pool
    written = write_splits(tmp_path / "splits_final.json", make_folds(pool, 3))
    from_file = module(pool_root, tmp_path, splits_file=str(written), fold=2)
    from_file.setup("fit")
    assert subjects(from_file, "val") == make_folds(pool, 3)[2]["val"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_folds": 3}, "data.fold is not set"),
    ({"fold": 0}, "needs data.num_folds=K"),
    ({"fold": 0, "num_folds": 3, "splits_file": "s.json"}, "one of them"),
    ({"fold": 3, "num_folds": 3}, r"data.fold=3: choose 0..2"),
    ({"fold": 0, "num_folds": 50}, "needs at least 50 subjects"),
])
def test_bad_fold_settings_say_which_key(pool_root, tmp_path, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        module(pool_root, tmp_path, **kwargs).setup("fit")


def test_a_fold_run_writes_its_folds_beside_the_checkpoints(compose_cfg, tmp_path) -> None:
    from ctseg.training import train

    cfg = compose_cfg("experiment=phantom_quick", "model.init_filters=8", "data.n_phantoms=8",
                      "data.phantom_shape=[24,24,16]", "data.patch_size=[16,16,16]",
                      "data.extra_roots=[]", "model.sw_batch_size=2", "callbacks.progress_bar=null",
                      "callbacks.overlays=null", "callbacks.model_summary=null",
                      "test=false", "logger=csv", "trainer.max_steps=1",
                      "trainer.check_val_every_n_epoch=1", "data.num_folds=3", "data.fold=1")
    _, objects = train(cfg)
    written = read_splits(tmp_path / "run" / "checkpoints" / "splits_final.json")
    assert written == objects["datamodule"].folds and len(written) == 3
    assert subjects(objects["datamodule"], "val") == written[1]["val"]
