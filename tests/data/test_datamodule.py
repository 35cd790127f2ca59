"""DataModules: splits, DDP shards, caches (none/memory/disk), batches and error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.data import CacheDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd
from torch.utils.data import DistributedSampler

from ctseg.data.datamodule import PhantomDataModule, SegmentationDataModule
from ctseg.data.layout import read_meta
from ctseg.data.merge import prepare
from ctseg.data.phantoms import write_phantoms
from ctseg.data.sampling import shard
from ctseg.data.volume_cache import CachedVolumes
from ctseg.errors import ConfigError
from ctseg.labels import num_classes

PATCH = 32
FAST = {"spacing": 3.0, "patch_size": PATCH, "num_workers": 0, "prepare_workers": 1}


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small phantoms: four train, one val, one test."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, 6, seed=1, shape=(40, 40, 32))
    return root


def _module(root: Path | list, tmp_path: Path, **kwargs) -> SegmentationDataModule:
    """A fast DataModule whose prepared labels and tensor cache live in tmp_path."""
    settings = {**FAST, "cache": "none", "prepared_dir": str(tmp_path / "prepared"),
                "cache_dir": str(tmp_path / "tensors"), **kwargs}
    return SegmentationDataModule(root=root if isinstance(root, list) else str(root),
                                      **settings)


def test_shard_is_disjoint_covering_and_even() -> None:
    records = list(range(7))
    shards = [shard(records, rank, 2, seed=5) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert set(shards[0]) | set(shards[1]) == set(records)
    # Only the one record repeated to even the lengths appears twice.
    assert len(shards[0]) + len(shards[1]) - len(set(shards[0]) | set(shards[1])) == 1
    assert shards == [shard(records, rank, 2, seed=5) for rank in range(2)]
    assert sorted(shard(records, 0, 1, seed=5)) == records
    even = [shard(list(range(6)), rank, 3) for rank in range(3)]
    assert sorted(r for part in even for r in part) == list(range(6))
    assert shard([42], 1, 2) == [42]
    with pytest.raises(ValueError, match="rank 2"):
        shard(records, 2, 2)


def test_phantom_module_batches(tmp_path: Path, tree_digest) -> None:
    root = tmp_path / "phantoms"
    dm = PhantomDataModule(root=str(root), n_phantoms=4, phantom_shape=(40, 40, 32),
                           batch_size=2, samples_per_volume=2, cache="none",
                           prepared_dir=str(tmp_path / "prepared"), **FAST)
    dm.prepare_data()
    digest = tree_digest(root)
    dm.prepare_data()
    assert tree_digest(root) == digest, "existing phantoms must not be rewritten"
    dm.setup("fit")
    assert (len(dm.records["train"]), len(dm.records["val"])) == (2, 1)
    batch = next(iter(dm.train_dataloader()))
    image, label = batch["image"], batch["label"]
    assert tuple(image.shape) == (4, 1, PATCH, PATCH, PATCH)
    assert label.shape == image.shape
    assert image.dtype == torch.float32
    assert label.dtype == torch.uint8
    assert 0 < int(label.max()) <= dm.num_classes - 1
    assert dm.num_classes == num_classes("v1") == len(dm.label_names)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[0] == 1
    # Validation sees the image's own voxels: every labelled voxel of the phantom resampled by
    # MONAI, none of the padding up to whole patches that training volumes carry.
    record = dm.records["val"][0]
    grid = Compose([LoadImaged(keys="label"), EnsureChannelFirstd(keys="label"),
                    Orientationd(keys="label", axcodes="RAS"),
                    Spacingd(keys="label", pixdim=3.0, mode="nearest")])({"label": record["label"]})
    assert val["label"].shape == val["image"].shape
    assert all(v <= g for v, g in zip(val["label"].shape[2:], grid["label"].shape[1:],
                                      strict=True))
    counts = [torch.bincount(torch.as_tensor(v).flatten().long(), minlength=dm.num_classes)
              for v in (val["label"], grid["label"])]
    assert int(counts[1][1:].sum()) > 0
    assert torch.equal(counts[0][1:], counts[1][1:])
    # Hyper-parameters are builtins only: checkpoints and YAML loggers can store them.
    assert yaml.safe_load(yaml.safe_dump(dict(dm.hparams)))["phantom_shape"] == [40, 40, 32]
    assert dm.hparams.spacing == 3.0
    assert "root" not in dm.hparams
    assert dm.hparams.cache == "none"


def test_cache_modes_give_identical_tensors(phantom_root: Path, tmp_path: Path) -> None:
    items = {}
    for cache in ("none", "memory", "disk"):
        dm = _module(phantom_root, tmp_path, cache=cache, cache_image_dtype="float32")
        dm.setup("validate")
        items[cache] = dm.datasets["val"][0]
    assert isinstance(dm.datasets["val"], CachedVolumes)
    entries = [p for p in dm.tensor_cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    # A second read is served from the files written by the first.
    again = dm.datasets["val"][0]
    for key in ("image", "label"):
        reference = torch.as_tensor(items["none"][key])
        for cache in ("memory", "disk"):
            assert torch.equal(torch.as_tensor(items[cache][key]), reference), (cache, key)
        assert torch.equal(torch.as_tensor(again[key]), reference)
    assert items["disk"]["label"].dtype == torch.uint8
    # float16 on disk: the same entry rebuilt, read back as the float32 image rounded to float16.
    half = _module(phantom_root, tmp_path, cache="disk", cache_image_dtype="float16")
    half.setup("validate")
    item, none = half.datasets["val"][0], items["none"]
    assert half.tensor_cache_dir == dm.tensor_cache_dir
    assert torch.equal(item["label"], torch.as_tensor(none["label"]))
    assert torch.equal(item["image"], torch.as_tensor(none["image"]).half().float())


def test_disk_cache_folder_follows_spacing(phantom_root: Path, tmp_path: Path) -> None:
    coarse = _module(phantom_root, tmp_path, cache="disk")
    fine = _module(phantom_root, tmp_path, cache="disk", spacing=1.5)
    assert coarse.tensor_cache_dir != fine.tensor_cache_dir
    assert coarse.tensor_cache_dir.parent == fine.tensor_cache_dir.parent == tmp_path / "tensors"
    shapes = []
    for dm in (coarse, fine):
        dm.setup("validate")
        shapes.append(tuple(dm.datasets["val"][0]["image"].shape))
        assert len(list(dm.tensor_cache_dir.glob("*/meta.json"))) == 1
    assert shapes[0] != shapes[1]


def test_ranks_cache_only_their_shard(phantom_root: Path, tmp_path: Path) -> None:
    modules = [_module(phantom_root, tmp_path, cache="memory") for _ in range(2)]
    for rank, dm in enumerate(modules):
        dm.setup("fit", rank=rank, world_size=2)
    train = [dm.records["train"] for dm in modules]
    subjects = [{r["subject"] for r in records} for records in train]
    assert len(train[0]) == len(train[1]) == 2
    assert not subjects[0] & subjects[1]
    full = _module(phantom_root, tmp_path)
    full.setup("fit")
    assert subjects[0] | subjects[1] == {r["subject"] for r in full.records["train"]}
    for dm in modules:
        dataset = dm.datasets["train"]
        assert isinstance(dataset, CacheDataset)
        assert len(dataset) == 2
        assert len(dataset._cache) == 2
        # Records are already sharded: the sampler must not split them again.
        sampler = dm.train_dataloader().sampler
        assert isinstance(sampler, DistributedSampler)
        assert sampler.num_replicas == 1
        assert len(list(sampler)) == 2
    assert len(modules[0].records["val"]) == len(modules[1].records["val"]) == 1


def test_val_fraction_used_without_val_rows(phantom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "all_train"
    shutil.copytree(phantom_root, root)
    meta = root / "meta.csv"
    meta.write_text(meta.read_text().replace(";val", ";train").replace(";test", ";train"))
    dm = _module(root, tmp_path, val_fraction=0.3, seed=2)
    dm.setup("fit")
    assert (len(dm.records["train"]), len(dm.records["val"])) == (4, 2)
    val = {r["subject"] for r in dm.records["val"]}
    assert not val & {r["subject"] for r in dm.records["train"]}
    same = _module(root, tmp_path, val_fraction=0.3, seed=2)
    same.setup("fit")
    assert {r["subject"] for r in same.records["val"]} == val
    tiny = _module(root, tmp_path, val_fraction=0.01)
    tiny.setup("fit")
    assert len(tiny.records["val"]) == 1
    none = _module(root, tmp_path, val_fraction=0.0)
    none.setup("fit")
    assert none.records["val"] == []
    assert none.val_dataloader() == []


def test_real_crop_test_split_and_errors(shared_data: Path, tmp_path: Path, tree_digest) -> None:
    before = tree_digest(shared_data)
    dm = _module(shared_data, tmp_path, cache="disk")
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"meta\.csv: no 'train' subject for stage 'fit'"):
        dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    # 122x101x30 voxels at 3 mm: the crop's own voxels (its foreground box fills it), not the
    # padding up to whole patches that the cached training volume carries.
    assert tuple(batch["image"].shape) == (1, 1, 122, 101, 30)
    assert batch["subject"] == ["s0001"]
    assert tree_digest(shared_data) == before, "the raw dataset must never be written"


def test_extra_root_joins_test_split(shared_data: Path, phantom_root: Path,
                                     tmp_path: Path) -> None:
    dm = PhantomDataModule(root=str(phantom_root), n_phantoms=6, phantom_seed=1,
                           phantom_shape=(40, 40, 32), extra_roots=[str(shared_data)],
                           prepared_dir=str(tmp_path / "prepared"), **FAST)
    dm.prepare_data()
    dm.setup("test")
    phantom_tests = [s.image_id for s in read_meta(phantom_root) if s.split == "test"]
    real = [r for r in dm.records["test"] if r["image"].startswith(str(shared_data.resolve()))]
    assert [r["subject"] for r in real] == ["s0001"]
    assert len(dm.records["test"]) == len(phantom_tests) + 1


def test_extra_roots_can_join_training_oversampled(shared_data: Path, phantom_root: Path,
                                                   tmp_path: Path) -> None:
    dm = PhantomDataModule(root=str(phantom_root), n_phantoms=6, phantom_seed=1,
                           phantom_shape=(40, 40, 32), extra_roots=[str(shared_data)],
                           extra_split="train", extra_repeat=3,
                           prepared_dir=str(tmp_path / "prepared"), **FAST)
    dm.prepare_data()
    assert dm.split_sizes() == {"train": 4 + 3, "val": 1, "test": 1}
    dm.setup("fit")
    real = [r["subject"] for r in dm.records["train"] if r["image"].startswith(
        str(shared_data.resolve()))]
    assert real == ["s0001"] * 3
    assert (dm.hparams.extra_split, dm.hparams.extra_repeat) == ("train", 3)
    with pytest.raises(ValueError, match="extra_split must be"):
        PhantomDataModule(root=str(phantom_root), extra_split="holdout")


def test_pipeline_settings_are_recorded_resolved(phantom_root: Path, tmp_path: Path) -> None:
    dm = _module(phantom_root, tmp_path, val_crop=[32, 32, 32], sampler="classes")
    # predict.py reads smoothing from the checkpoint: None is stored as the value it stood for.
    assert (dm.hparams.smooth_sigma, dm.hparams.sampler, dm.hparams.val_crop) == (
        0.4, "classes", [32, 32, 32])
    assert _module(phantom_root, tmp_path, intensity="hu_window").hparams.smooth_sigma == 0.0
    dm.setup("fit")
    val = dm.datasets["val"][0]
    assert tuple(val["image"].shape) == (1, 32, 32, 32)
    assert "label_cls_indices" not in val
    test = _module(phantom_root, tmp_path, val_crop=[32, 32, 32])
    test.setup("test")
    assert test.datasets["test"][0]["image"].shape[1] > 32  # the crop is validation's only


def test_disk_cache_serves_both_samplers_from_one_entry(phantom_root: Path,
                                                         tmp_path: Path) -> None:
    for sampler in ("random", "classes"):
        dm = _module(phantom_root, tmp_path, cache="disk", sampler=sampler, samples_per_volume=2)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert tuple(batch["image"].shape) == (4, 1, PATCH, PATCH, PATCH)
        assert batch["label"].dtype == torch.uint8
        for index in range(len(dm.records["train"])):
            dm.datasets["train"][index]
        val = dm.datasets["val"][0]
        assert "label_cls_indices" not in val
    # One entry per subject (train and val), whichever sampler read it.
    assert len(list(dm.tensor_cache_dir.glob("*/meta.json"))) == len(dm.records["train"]) + 1


def test_invalid_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="disk, memory, none"):
        _module(tmp_path, tmp_path, cache="ram")
    with pytest.raises(ConfigError, match=r"data\.cache_image_dtype='float64': the disk cache "
                                          r"stores images as float16 or float32"):
        _module(tmp_path, tmp_path, cache="disk", cache_image_dtype="float64")
    with pytest.raises(ValueError, match="v1, v2"):
        _module(tmp_path, tmp_path, version="v3")
    with pytest.raises(ValueError, match="val_fraction"):
        _module(tmp_path, tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="segresnet, hu_window"):
        _module(tmp_path, tmp_path, intensity="minmax")


def test_another_phantom_seed_trains_on_that_seeds_phantoms(tmp_path: Path) -> None:
    root, shape = tmp_path / "phantoms", (24, 24, 16)
    settings = {**FAST, "n_phantoms": 3, "phantom_shape": shape, "patch_size": 16,
                "cache": "none", "prepared_dir": str(tmp_path / "prepared")}
    first = PhantomDataModule(root=str(root), phantom_seed=0, **settings)
    first.prepare_data()
    first.setup("fit")
    dm = PhantomDataModule(root=str(root), phantom_seed=1, **settings)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.hparams.phantom_seed == 1
    reference = tmp_path / "seed1"
    write_phantoms(reference, 3, seed=1, shape=shape)
    merged = {r["image_id"]: r for r in prepare(reference, out=tmp_path / "reference").records}
    assert dm.records["train"]
    for record in dm.records["train"]:
        ours = Path(record["image"])
        assert ours.read_bytes() == (reference / ours.parent.name / "ct.nii.gz").read_bytes()
        expected = np.asanyarray(nib.load(merged[record["subject"]]["label"]).dataobj)
        assert np.array_equal(np.asanyarray(nib.load(record["label"]).dataobj), expected)
