"""Transform pipelines: settings validation, cache fingerprint, geometry, dtypes and inversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.losses import DiceCELoss
from monai.transforms import GaussianSmoothd, Invertd

from ctseg.data.merge import prepare
from ctseg.data.transforms import (
    INTENSITIES,
    VALID,
    PipelineConfig,
    eval_transforms,
    infer_transforms,
    train_transforms,
    volume_transforms,
)
from ctseg.labels import num_classes
from ctseg.models.base import PerClassDice

PATCH = 32


@pytest.fixture(scope="module")
def real_record(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Record of the real crop s0001 (122x101x30 at 3 mm), merged into a temporary folder."""
    return prepare(shared_data, out=tmp_path_factory.mktemp("prepared_real")).records[0]


def _item(record: dict) -> dict:
    """The keys the pipelines read."""
    return {"image": record["image"], "label": record["label"]}


def _world_centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    """World coordinates (mm) of the centre of the voxels of class `value`."""
    ijk = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_config_normalises_and_validates() -> None:
    cfg = PipelineConfig(spacing=2, patch_size=48, hu_window=[-100, 300])
    assert cfg.spacing == (2.0, 2.0, 2.0)
    assert cfg.patch_size == (48, 48, 48)
    assert cfg.hu_window == (-100.0, 300.0)
    assert PipelineConfig(spacing=[1.5, 1.5, 3]).spacing == (1.5, 1.5, 3.0)
    with pytest.raises(ValueError, match="segresnet, hu_window"):
        PipelineConfig(intensity="zscore")
    with pytest.raises(ValueError, match="spacing"):
        PipelineConfig(spacing=0)
    with pytest.raises(ValueError, match="spacing"):
        PipelineConfig(spacing=(1.5, 1.5))
    with pytest.raises(ValueError, match="patch_size"):
        PipelineConfig(patch_size=(96, 96, 95.5))
    with pytest.raises(ValueError, match="hu_window"):
        PipelineConfig(hu_window=(100, -100))
    with pytest.raises(ValueError, match="samples_per_volume"):
        PipelineConfig(samples_per_volume=0)


def test_fingerprint_tracks_only_cached_settings() -> None:
    base = PipelineConfig(spacing=1.5)
    assert base.fingerprint() == PipelineConfig(spacing=(1.5, 1.5, 1.5)).fingerprint()
    assert len(base.fingerprint()) == 12
    changed = [PipelineConfig(spacing=3.0), PipelineConfig(intensity="hu_window"),
               PipelineConfig(patch_size=64)]
    assert len({base.fingerprint(), *(c.fingerprint() for c in changed)}) == 4
    # Random patches are drawn after the cache: the number of samples does not invalidate it.
    assert PipelineConfig(samples_per_volume=4).fingerprint() == base.fingerprint()
    # The HU window only matters to the scheme that uses it.
    assert PipelineConfig(hu_window=(-500, 500)).fingerprint() == base.fingerprint()
    hu = PipelineConfig(intensity="hu_window")
    assert PipelineConfig(intensity="hu_window", hu_window=(-500, 500)).fingerprint() != \
        hu.fingerprint()


@pytest.mark.parametrize(("spacing", "shape", "padded"), [
    (3.0, (122, 101, 30), (128, 128, 32)), (1.5, (243, 201, 59), (256, 224, 64))])
def test_real_crop_eval_geometry(real_record: dict, spacing: float, shape: tuple,
                                 padded: tuple) -> None:
    cfg = PipelineConfig(spacing=spacing, patch_size=PATCH)
    # Training volumes: 122x101x30 voxels of 3 mm resampled, foreground-cropped and rounded up
    # to multiples of 32, with the mask of the voxels that come from the image.
    volume = volume_transforms(cfg)(_item(real_record))
    assert tuple(volume["image"].shape) == (1, *padded)
    assert int(volume[VALID].sum()) == int(np.prod(shape))
    # Evaluation: the image's own voxels (the foreground box fills this crop), no padding.
    out = eval_transforms(cfg)(_item(real_record))
    image, label = out["image"], out["label"]
    assert tuple(image.shape) == (1, *shape)
    assert VALID not in out
    assert label.shape == image.shape
    assert image.dtype == torch.float32
    assert label.dtype == torch.uint8
    assert torch.allclose(image.pixdim.float(), torch.full((3,), spacing))
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert float(image.min()) == pytest.approx(-1.0)
    assert float(image.max()) == pytest.approx(1.0)
    raw = np.asarray(nib.load(real_record["label"]).dataobj)
    assert set(torch.unique(label).tolist()) <= set(np.unique(raw).tolist())
    # Liver (class 5 in v1) stays where it was in world coordinates (within a voxel).
    liver = 5
    before = _world_centroid(raw, nib.load(real_record["label"]).affine, liver)
    after = _world_centroid(label[0].numpy(), image.affine.numpy(), liver)
    assert np.abs(before - after).max() < 3.0


def test_hu_window_scheme_maps_window_to_unit_range(real_record: dict) -> None:
    cfg = PipelineConfig(spacing=3.0, intensity="hu_window", hu_window=(-200, 300),
                         patch_size=PATCH)
    image = eval_transforms(cfg)(_item(real_record))["image"]
    raw = np.asarray(nib.load(real_record["image"]).dataobj)
    assert float(image.min()) == 0.0
    assert float(image.max()) == 1.0
    # Resampling 3 mm to 3 mm and cropping around voxels above the floor keeps all of them.
    assert int((image > 0).sum()) == pytest.approx(int((raw > -200).sum()), rel=0.01)


def test_phantoms_resampled_to_ras_and_spacing(phantom_records: list[dict]) -> None:
    cfg = PipelineConfig(spacing=3.0, patch_size=PATCH)
    transform = eval_transforms(cfg)
    codes = set()
    for record in phantom_records:
        raw = nib.load(record["label"])
        codes.add(nib.aff2axcodes(raw.affine))
        out = transform(_item(record))
        image, label = out["image"], out["label"]
        assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
        assert torch.allclose(image.pixdim.float(), torch.full((3,), 3.0))
        assert label.shape == image.shape
        data = np.asarray(raw.dataobj)
        present = [int(v) for v in np.unique(data) if v > 0]
        assert present
        biggest = max(present, key=lambda v: int((data == v).sum()))
        before = _world_centroid(data, raw.affine, biggest)
        after = _world_centroid(label[0].numpy(), image.affine.numpy(), biggest)
        assert np.abs(before - after).max() < 3.0
    assert len(codes) > 1, "phantoms should cover several orientations"


def test_train_patches_feed_loss_and_metric(phantom_records: list[dict]) -> None:
    cfg = PipelineConfig(spacing=3.0, patch_size=PATCH, samples_per_volume=2)
    transform = train_transforms(cfg)
    samples = [transform(_item(r)) for r in phantom_records[:2]]
    assert all(len(s) == 2 for s in samples)
    batch = list_data_collate(samples)
    image, label = batch["image"], batch["label"]
    assert tuple(image.shape) == (4, 1, PATCH, PATCH, PATCH)
    assert label.shape == image.shape
    assert image.dtype == torch.float32
    assert label.dtype == torch.uint8
    classes = num_classes("v1")
    assert int(label.max()) <= classes - 1
    logits = torch.randn(4, classes, PATCH, PATCH, PATCH)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert torch.isfinite(loss)
    metric = PerClassDice(classes)
    metric.update(logits.argmax(dim=1), label[:, 0])
    assert int(metric.target_count.sum()) == label.numel()


def test_patch_larger_than_volume_is_padded(real_record: dict) -> None:
    # At 3 mm the crop is 30 slices thick; 48-voxel patches must still come out whole.
    cfg = PipelineConfig(spacing=3.0, intensity="hu_window", patch_size=(48, 48, 48))
    patches = train_transforms(cfg)(_item(real_record))
    assert tuple(patches[0]["image"].shape) == (1, 48, 48, 48)
    assert tuple(patches[0]["label"].shape) == (1, 48, 48, 48)


@pytest.mark.parametrize("intensity", INTENSITIES)
def test_infer_transforms_invert_to_input_grid(phantom_records: list[dict],
                                               intensity: str) -> None:
    record = next(r for r in phantom_records
                  if nib.aff2axcodes(nib.load(r["image"]).affine) != ("R", "A", "S"))
    raw = nib.load(record["image"])
    cfg = PipelineConfig(spacing=2.0, intensity=intensity)
    transform = infer_transforms(cfg)
    data = transform({"image": record["image"]})
    assert "label" not in data
    assert torch.allclose(data["image"].pixdim.float(), torch.full((3,), 2.0))
    # A "prediction" that marks body voxels; inverted back it must match the raw body mask.
    low, high = float(data["image"].min()), float(data["image"].max())
    data["pred"] = (data["image"] > low + 0.2 * (high - low)).to(torch.float32)
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image",
                       nearest_interp=True)(data)["pred"]
    assert tuple(inverted.shape) == (1, *raw.shape)
    assert np.allclose(inverted.affine.numpy(), raw.affine, atol=1e-4)
    body = np.asarray(raw.dataobj) > -500
    agreement = float((inverted[0].numpy().astype(bool) == body).mean())
    assert agreement > 0.95


def test_smoothing_sampler_and_class_count_are_validated() -> None:
    assert PipelineConfig().smooth_sigma == 0.4  # train.json's smoothing for the segresnet scheme
    assert PipelineConfig(intensity="hu_window").smooth_sigma == 0.0
    assert PipelineConfig(smooth_sigma=0).smooth_sigma == 0.0
    with pytest.raises(ValueError, match="smooth_sigma must be >= 0"):
        PipelineConfig(smooth_sigma=-1)
    with pytest.raises(ValueError, match="unknown patch sampler 'nnunet'"):
        PipelineConfig(sampler="nnunet")
    with pytest.raises(ValueError, match="classes sampler needs num_classes"):
        PipelineConfig(sampler="classes")
    base = PipelineConfig()
    # Smoothing changes the cached volume; the patch sampler does not.
    assert PipelineConfig(smooth_sigma=0.0).fingerprint() != base.fingerprint()
    assert PipelineConfig(sampler="classes", num_classes=105).fingerprint() == base.fingerprint()


def test_smoothing_is_applied_only_when_asked(real_record: dict) -> None:
    smooth = eval_transforms(PipelineConfig(spacing=3.0, patch_size=PATCH))(_item(real_record))
    sharp = eval_transforms(PipelineConfig(spacing=3.0, patch_size=PATCH, smooth_sigma=0))(
        _item(real_record))
    assert smooth["image"].shape == sharp["image"].shape
    assert float((smooth["image"] - sharp["image"]).abs().max()) > 0.05
    assert torch.equal(smooth["label"], sharp["label"])
    for sigma, present in ((0.0, False), (0.4, True)):
        steps = infer_transforms(PipelineConfig(smooth_sigma=sigma)).transforms
        assert any(isinstance(t, GaussianSmoothd) for t in steps) is present


def test_classes_sampler_centres_patches_on_present_classes(phantom_records: list[dict]) -> None:
    classes = num_classes("v1")
    centres = {}
    for sampler in ("random", "classes"):
        cfg = PipelineConfig(spacing=3.0, patch_size=16, samples_per_volume=24, sampler=sampler,
                             num_classes=classes)
        transform = train_transforms(cfg)
        transform.set_random_state(seed=0)
        patches = [p for r in phantom_records for p in transform(_item(r))]
        assert all(tuple(p["image"].shape) == (1, 16, 16, 16) for p in patches)
        assert not any("label_cls_indices" in p for p in patches)  # not passed on to batches
        centres[sampler] = [int(p["label"][0, 8, 8, 8]) for p in patches]
    # Classes are drawn uniformly among those present (background is one of ~19), voxels not.
    background = {s: c.count(0) / len(c) for s, c in centres.items()}
    assert background["classes"] < 0.2 < background["random"]
    assert len(set(centres["classes"])) > len(set(centres["random"]))


def test_eval_center_crop(real_record: dict) -> None:
    cfg = PipelineConfig(spacing=1.5, patch_size=PATCH)
    crop = eval_transforms(cfg, center_crop=(64, 64, 64))(_item(real_record))
    assert tuple(crop["image"].shape) == (1, 64, 64, 64)
    assert crop["label"].shape == crop["image"].shape
    # The centre crop is the bundle's validation: a crop of the volume padded to whole patches.
    whole = volume_transforms(cfg)(_item(real_record))
    starts = [(w - 64) // 2 for w in whole["image"].shape[1:]]
    window = tuple(slice(s, s + 64) for s in starts)
    assert torch.equal(crop["image"][0], whole["image"][0][window])


def test_building_the_pipelines_logs_no_monai_codec_noise():
    # MONAI's LoadImage builds an nvImageCodec DICOM reader that warns without the GPU codec.
    code = ("from ctseg.data.transforms import PipelineConfig, eval_transforms, infer_transforms, "
            "train_transforms; cfg = PipelineConfig(spacing=3.0); "
            "[f(cfg) for f in (train_transforms, eval_transforms, infer_transforms)]; "
            "print('built')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "built" in result.stdout, result.stderr[-2000:]
    assert "nvImageCodec" not in result.stderr + result.stdout
