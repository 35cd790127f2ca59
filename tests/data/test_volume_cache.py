"""The volume cache: equal to the MONAI pipeline, patches by memory map, invalidation, concurrent
writers, damaged entries, entries of another format or image dtype, float16 patches against
float32 ones, and patch sampling that reaches every class."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms.utils import generate_spatial_bounding_box

from ctseg.data.merge import prepare
from ctseg.data.transforms import VALID, PipelineConfig, eval_transforms, volume_transforms
from ctseg.data.volume_cache import (
    CACHE_FORMAT,
    IMAGE_DTYPES,
    IMAGE_FILE,
    LABEL_FILE,
    META_FILE,
    CachedPatches,
    CachedVolumes,
    VolumeCache,
    patch_start,
)
from ctseg.errors import ConfigError, DatasetError
from ctseg.labels import num_classes

PATCH = 16


@pytest.fixture
def records(phantom_records: list[dict]) -> list[dict]:
    """Image and label of two small phantoms."""
    return [{"image": r["image"], "label": r["label"]} for r in phantom_records[:2]]


@pytest.fixture(scope="module")
def real_record(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Image and merged v1 label of the shared real crop."""
    record = prepare(shared_data, out=tmp_path_factory.mktemp("prepared_real")).records[0]
    return {"image": record["image"], "label": record["label"]}


def _pipeline(**kwargs) -> PipelineConfig:
    """A 3 mm pipeline with 16^3 patches and the v1 class count."""
    return PipelineConfig(**{"spacing": 3.0, "patch_size": PATCH, "num_classes": num_classes("v1"),
                             **kwargs})


def test_entry_equals_the_monai_pipeline_and_patches_are_its_slices(records, tmp_path):
    cache = VolumeCache(tmp_path, _pipeline(), "float32")
    volume = cache.entry(records[0])
    reference = volume_transforms(_pipeline())(dict(records[0]))
    whole = volume.read()
    assert torch.equal(whole["image"], reference["image"].as_tensor())
    assert torch.equal(whole["label"], reference["label"].as_tensor())
    assert whole["label"].dtype == torch.uint8
    # Evaluation reads the image's own voxels: the box of MONAI's pipeline without the padding.
    start, stop = generate_spatial_bounding_box(reference[VALID])
    assert volume.valid == (tuple(start), tuple(b - a for a, b in zip(start, stop, strict=True)))
    evaluated = CachedVolumes(cache, records[:1])[0]
    unpadded = eval_transforms(_pipeline())(dict(records[0]))
    assert evaluated["image"].shape != whole["image"].shape
    assert torch.equal(evaluated["image"], unpadded["image"].as_tensor())
    assert torch.equal(evaluated["label"], unpadded["label"].as_tensor())
    patch = volume.read((3, 5, 7), (PATCH,) * 3)
    assert torch.equal(patch["image"], whole["image"][:, 3:19, 5:21, 7:23])
    assert cache.size_on_disk() == sum(p.stat().st_size for p in volume.folder.iterdir())
    # Built once: a second request finds the entry as it is.
    stamp = (volume.folder / IMAGE_FILE).stat().st_mtime_ns
    assert cache.entry(records[0]).folder == volume.folder
    assert (volume.folder / IMAGE_FILE).stat().st_mtime_ns == stamp


def test_centre_crop_equals_monai(records, tmp_path):
    cache = VolumeCache(tmp_path, _pipeline())
    item = CachedVolumes(cache, records[:1], center_crop=(33, 24, 100))[0]
    reference = eval_transforms(_pipeline(), center_crop=(33, 24, 100))(dict(records[0]))
    assert item["image"].shape == reference["image"].shape
    assert torch.equal(item["image"], reference["image"].as_tensor())
    assert torch.equal(item["label"], reference["label"].as_tensor())


def test_settings_and_changed_files_never_serve_stale_entries(records, tmp_path):
    coarse, fine = VolumeCache(tmp_path, _pipeline()), VolumeCache(tmp_path, _pipeline(spacing=2))
    assert coarse.root != fine.root
    assert coarse.entry(records[0]).shape != fine.entry(records[0]).shape
    # Both samplers share entries; another smoothing does not.
    assert VolumeCache(tmp_path, _pipeline(sampler="classes")).root == coarse.root
    assert VolumeCache(tmp_path, _pipeline(smooth_sigma=0)).root != coarse.root
    record = dict(records[0], label=str(tmp_path / "label.nii.gz"))
    shutil.copy(records[0]["label"], record["label"])
    first = coarse.entry(record).folder
    os.utime(record["label"], ns=(1, 1))  # the label map was rewritten
    assert coarse.entry(record).folder != first


def test_damaged_entry_is_detected_and_rebuilt(records, tmp_path, caplog):
    cache = VolumeCache(tmp_path, _pipeline())
    volume = cache.entry(records[1])
    expected = volume.read()
    image = volume.folder / IMAGE_FILE
    image.write_bytes(image.read_bytes()[:1000])  # truncated
    rebuilt = cache.entry(records[1])
    assert "incomplete or damaged; rebuilding it" in caplog.text
    assert torch.equal(rebuilt.read()["image"], expected["image"])
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]


def _build(root: str, record: dict, barrier) -> str:
    """Build one entry in a fresh process, after every builder is ready."""
    barrier.wait()
    return str(VolumeCache(root, _pipeline()).entry(record).folder)


def test_concurrent_builders_leave_one_valid_entry(records, tmp_path):
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(3)
        with context.Pool(3) as pool:
            folders = pool.starmap(_build, [(str(tmp_path), records[0], barrier)] * 3)
    assert len(set(folders)) == 1
    cache = VolumeCache(tmp_path, _pipeline())
    assert [p.name for p in cache.root.iterdir()] == [Path(folders[0]).name]
    reference = volume_transforms(_pipeline())(dict(records[0]))
    assert torch.equal(cache.entry(records[0]).read()["image"], reference["image"].as_tensor())


def test_classes_sampler_reaches_every_class(records, tmp_path):
    cache = VolumeCache(tmp_path, _pipeline(sampler="classes"))
    volume = cache.entry(records[0])
    present = set(np.unique(np.asarray(volume.label())).tolist())
    assert len(present) > 10
    assert set(volume.locations) == present
    torch.manual_seed(0)
    centres = set()
    for _ in range(600):
        start = patch_start(volume, (PATCH,) * 3, "classes")
        assert all(0 <= a <= d - PATCH for a, d in zip(start, volume.shape, strict=True))
        box = tuple(slice(a, a + PATCH) for a in start)
        centres.update(np.unique(np.asarray(volume.label()[0][box])).tolist())
    assert centres == present
    patches = CachedPatches(VolumeCache(tmp_path, _pipeline(samples_per_volume=3)), records)[1]
    assert [tuple(p["image"].shape) for p in patches] == [(1, PATCH, PATCH, PATCH)] * 3


def test_warm_builds_in_parallel_and_names_a_bad_file(records, tmp_path):
    cache = VolumeCache(tmp_path / "cache", _pipeline())
    cache.warm(records, workers=2)
    assert len(list(cache.root.glob("*/meta.json"))) == len(records)
    broken = dict(records[0], image=str(tmp_path / "broken.nii.gz"))
    Path(broken["image"]).write_bytes(Path(records[0]["image"]).read_bytes()[:3000])
    with pytest.raises(DatasetError, match=r"broken\.nii\.gz: cannot preprocess this subject"):
        cache.warm([broken, records[1]], workers=2)


def _no_leftovers(cache: VolumeCache) -> bool:
    """No temporary or trash folder of a builder is left in the cache root."""
    return not [p for p in cache.root.iterdir() if p.name.startswith(".")]


def test_image_dtype_option_stores_float16_and_reads_float32(records, tmp_path):
    half, full = (VolumeCache(tmp_path / d, _pipeline(), d) for d in ("float16", "float32"))
    assert half.root.name == full.root.name  # the dtype is not a preprocessing setting
    for cache, dtype, width in ((half, np.float16, 2), (full, np.float32, 4)):
        volume = cache.entry(records[0])
        stored = np.load(volume.folder / IMAGE_FILE, mmap_mode="r")
        assert stored.dtype == dtype
        assert json.loads((volume.folder / META_FILE).read_text())["dtype"] == dtype.__name__
        voxels = int(np.prod(volume.shape))
        # Bytes per voxel on disk: the image's width plus the uint8 label (+ .npy headers).
        assert (volume.folder / IMAGE_FILE).stat().st_size - voxels * width <= 128
        assert (volume.folder / LABEL_FILE).stat().st_size - voxels <= 128
        assert volume.read()["image"].dtype == torch.float32
    with pytest.raises(ConfigError, match=r"data\.cache_image_dtype='bfloat16': .* float16 or "
                                          r"float32"):
        VolumeCache(tmp_path, _pipeline(), "bfloat16")


def test_entry_of_another_dtype_or_an_older_format_is_rebuilt(records, tmp_path, caplog):
    full = VolumeCache(tmp_path, _pipeline(), "float32")
    folder = full.entry(records[0]).folder
    expected = full.entry(records[0]).read()["image"]
    # Asked for float16, the float32 entry is rebuilt as float16 in the same place.
    half = VolumeCache(tmp_path, _pipeline(), "float16")
    rebuilt = half.entry(records[0])
    assert "holds float32 images, not float16; rebuilding it" in caplog.text
    assert rebuilt.folder == folder and rebuilt.image().dtype == np.float16
    assert torch.equal(rebuilt.read()["image"], expected.half().float())
    assert _no_leftovers(half)
    # An entry written by the previous format (format 2: float32 image, no dtype in meta.json)
    # is rebuilt, by warm() as by entry().
    full.warm(records)
    for record in records:
        meta_file = full.entry(record).folder / META_FILE
        meta = json.loads(meta_file.read_text())
        del meta["dtype"]
        meta_file.write_text(json.dumps({**meta, "format": 2}))
    caplog.clear()
    full.warm(records)
    assert caplog.text.count(f"is of cache format 2, not {CACHE_FORMAT}; rebuilding it") == 2
    for record in records:
        meta = json.loads((full.entry(record).folder / META_FILE).read_text())
        assert (meta["format"], meta["dtype"]) == (CACHE_FORMAT, "float32")
    assert _no_leftovers(full)


@pytest.mark.parametrize("intensity", ["segresnet", "hu_window"])
def test_float16_patches_agree_with_float32(records, real_record, tmp_path, intensity):
    """The same sampled training patches from a float16 and a float32 cache: labels equal,
    images float32 in both, each float16 voxel the float32 one rounded to nearest, so no voxel
    of the network input differs by more than 2**-12 (values lie in [-1, 1])."""
    pipeline = _pipeline(intensity=intensity, sampler="classes", samples_per_volume=8)
    worst = 0.0
    for record in [*records, real_record]:
        patches = {}
        for dtype in IMAGE_DTYPES:
            torch.manual_seed(0)
            patches[dtype] = CachedPatches(VolumeCache(tmp_path / dtype, pipeline, dtype),
                                           [record])[0]
        for half, full in zip(patches["float16"], patches["float32"], strict=True):
            assert half["image"].dtype == full["image"].dtype == torch.float32
            assert torch.equal(half["label"], full["label"])
            assert torch.equal(half["image"], full["image"].half().float())
            worst = max(worst, float((half["image"] - full["image"]).abs().max()))
    assert 0 < worst <= 2 ** -12
