"""ctseg against the wholeBody_ct_segmentation bundle's own recipes (`ctseg.reference`), written
from its inference.json and train.json with MONAI's transforms only."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctseg.data.merge import prepare
from ctseg.data.transforms import (
    PipelineConfig,
    eval_transforms,
    train_transforms,
    volume_transforms,
)
from ctseg.inference.inputs import Case, load_case
from ctseg.inference.pipeline import CasePredictor, PredictOptions
from ctseg.inference.runner import run
from ctseg.models.loading import load_model
from ctseg.reference import wholebody_bundle as bundle

RECIPES = {"lowres": 3.0, "highres": 1.5}


@pytest.fixture(scope="module")
def real_record(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared crop with its merged v1 label map."""
    return prepare(shared_data, out=tmp_path_factory.mktemp("prepared")).records[0]


def _predict_cfg(weights: Path, ct: Path, out: Path, spacing: float, *overrides: str) -> dict:
    """predict.py's configuration for a bundle model.pt, as conf/predict.yaml composes it."""
    from hydra import compose, initialize_config_dir

    from ctseg.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("predict", overrides=[f"ckpt={weights}", f"input={ct}", f"output={out}",
                                            f"data.spacing={spacing}", "device=cpu",
                                            "masks=false", "progress=false", *overrides])
    return cfg


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_prediction_preprocessing_equals_inference_json(bundle_weights, shared_data, recipe):
    spacing = RECIPES[recipe]
    ct = shared_data / "s0001" / "ct.nii.gz"
    cfg = _predict_cfg(bundle_weights, ct, Path("unused"), spacing)
    predictor = CasePredictor(load_model(bundle_weights, cfg.model, cfg.data),
                              PredictOptions(device="cpu"))
    ours = predictor.transforms({"image": load_case(Case("ct", ct, "nifti"))[0]})["image"]
    reference = bundle.inference_preprocessing(bundle.PIXDIM[recipe])({"image": str(ct)})["image"]
    assert ours.shape == reference.shape
    assert np.allclose(ours.affine.numpy(), reference.affine.numpy(), atol=1e-6)
    assert torch.allclose(ours.as_tensor(), reference.as_tensor().float(), atol=1e-5)


def test_prediction_labels_equal_the_bundles_own(bundle_weights, shared_data, tmp_path):
    ct = shared_data / "s0001" / "ct.nii.gz"
    spacing = RECIPES["lowres"]
    state = torch.load(bundle_weights, weights_only=True)
    reference = bundle.predict(str(ct), state, bundle.PIXDIM["lowres"])
    assert len(np.unique(reference)) > 5
    agreement = {}
    for name, overrides in (("bundle", []), ("smoothed", ["data.smooth_sigma=0.4"])):
        cfg = _predict_cfg(bundle_weights, ct, tmp_path / name, spacing, *overrides)
        assert run(cfg) == 0
        ours = np.asarray(nib.load(tmp_path / name / "ct" / "labels.nii.gz").dataobj)
        assert ours.shape == reference.shape == nib.load(ct).shape
        agreement[name] = float((ours == reference).mean())
    assert agreement["bundle"] >= 0.999, agreement
    # Random weights give labels that follow the input closely: train.json's smoothing alone
    # changes 41 % of them (docs/prediction.md, "Bundle compatibility": 59 % agree), which this
    # comparison must see.
    assert agreement["smoothed"] == pytest.approx(0.59, abs=0.05), agreement


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_training_pipeline_equals_train_json(real_record: dict, recipe: str) -> None:
    pixdim = bundle.PIXDIM[recipe]
    item = {"image": real_record["image"], "label": real_record["label"]}
    cfg = PipelineConfig(spacing=pixdim, patch_size=bundle.ROI)
    ours = volume_transforms(cfg)(dict(item))
    reference = bundle.Compose(bundle.train_deterministic(pixdim))(dict(item))
    assert ours["image"].shape == reference["image"].shape
    assert torch.allclose(ours["image"].as_tensor(), reference["image"].as_tensor(), atol=1e-5)
    assert torch.equal(ours["label"].as_tensor().long(), reference["label"].as_tensor().long())
    # The random patch is one 96^3 crop of that volume, as RandSpatialCropd gives.
    patch = train_transforms(cfg)(dict(item))[0]
    assert tuple(patch["image"].shape) == (1, *bundle.ROI)


def test_validation_crop_equals_train_json(real_record: dict) -> None:
    pixdim = bundle.PIXDIM["highres"]
    item = {"image": real_record["image"], "label": real_record["label"]}
    cfg = PipelineConfig(spacing=pixdim, patch_size=bundle.ROI)
    ours = eval_transforms(cfg, center_crop=bundle.VAL_CROP)(dict(item))
    reference = bundle.validate_preprocessing(pixdim)(dict(item))
    # 160^3 where the volume is larger; the crop is 96 voxels thick at 1.5 mm and stays so.
    assert tuple(ours["image"].shape) == tuple(reference["image"].shape) == (1, 160, 160, 96)
    assert torch.allclose(ours["image"].as_tensor(), reference["image"].as_tensor(), atol=1e-5)
    assert torch.equal(ours["label"].as_tensor().long(), reference["label"].as_tensor().long())
