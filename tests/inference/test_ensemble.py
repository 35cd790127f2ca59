"""Fold ensembles and mirroring TTA in prediction: [a, a] predicts what a does, [a, b] what the
mean of a's and b's probabilities from MONAI's own sliding-window inferer gives, and with
tta=mirror the prediction of a mirrored CT is the mirrored prediction; VISTA3D's ensembles average
its class sigmoids the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO
from helpers import save_checkpoint as save_lightning_checkpoint
from monai.inferers import SlidingWindowInferer

from ctseg.errors import ConfigError
from ctseg.inference.ensemble import (
    MeanProbabilities,
    MeanSigmoids,
    check_members,
    mirror_flips,
    run_checkpoints,
)
from ctseg.inference.inputs import Case
from ctseg.inference.pipeline import IMAGE, CasePredictor, PredictOptions
from ctseg.inference.prompts import Prompt
from ctseg.labels import label_names
from ctseg.models.loading import load_model
from ctseg.models.segresnet import SegResNetModule
from ctseg.models.vista3d import VISTA3DModule

ROI = (32, 32, 32)
OPTIONS = {"device": "cpu", "masks": False, "overlap": 0.25}


def module(seed: int) -> SegResNetModule:
    """A random-weight slim 105-class SegResNet."""
    torch.manual_seed(seed)
    return SegResNetModule(num_classes=105, label_names=label_names("v1"), init_filters=8,
                           roi_size=ROI)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two checkpoints (seeds 0 and 1) at the shared crop's own 3 mm, so the model grid is the
    CT's grid."""
    folder = tmp_path_factory.mktemp("ensemble")
    data = {"version": "v1", "spacing": 3.0, "intensity": "segresnet", "patch_size": list(ROI)}
    return tuple(save_lightning_checkpoint(module(s), folder / f"m{s}.ckpt", data) for s in (0, 1))


@pytest.fixture(scope="module")
def ct(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared crop cut to 56 x 56 x 30 voxels: with 32-voxel windows and overlap 0.25 the
    window grid is symmetric, so a mirrored CT meets mirrored windows."""
    img = nib.load(shared_ct)
    data = np.asanyarray(img.dataobj)[33:89, 22:78, :]
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return path


def labels(models: list, ct: Path, **options) -> np.ndarray:
    """The label map predict.py writes for `ct` with the first model and the others as members."""
    loaded = [load_model(m, {}, {}) for m in models]
    with CasePredictor(loaded[0], PredictOptions(**OPTIONS, **options), loaded[1:]) as p:
        return p.segment(Case("ct", ct, "nifti")).labels


def test_an_ensemble_of_one_model_twice_predicts_what_the_model_does(checkpoints, ct) -> None:
    a, _ = checkpoints
    single = labels([a], ct)
    assert np.array_equal(labels([a, a], ct), single)
    assert len(np.unique(single)) > 5  # a map with many classes, not a constant


def test_an_ensemble_equals_the_mean_of_monais_probabilities(checkpoints, ct) -> None:
    a, b = checkpoints
    ours = labels([a, b], ct)
    models = [load_model(m, {}, {}) for m in (a, b)]
    with CasePredictor(models[0], PredictOptions(**OPTIONS)) as predictor:
        image = predictor.prepare(Case("ct", ct, "nifti")).data[IMAGE][None].as_tensor()
    assert image.shape[2:] == ours.shape  # the CT's own grid: no resampling to undo
    inferer = SlidingWindowInferer(ROI, sw_batch_size=1, overlap=0.25, mode="gaussian",
                                   padding_mode="replicate")
    def window_mean(windows: torch.Tensor) -> torch.Tensor:
        """Each window's mean probability of a and b (in log space for the blend)."""
        return torch.log(sum(torch.softmax(m.net(windows), dim=1) for m in models) / 2)

    with torch.no_grad():
        per_window = inferer(image, window_mean).argmax(1)[0].numpy()
        per_model = (sum(torch.softmax(inferer(image, m.net), dim=1) for m in models) / 2
                     ).argmax(1)[0].numpy()
    assert (ours == per_window).mean() >= 0.9999
    # MONAI blends each model over the windows before averaging; the orders differ where a
    # random network's 105 classes nearly tie (trained networks are far more confident)
    assert (ours == per_model).mean() >= 0.98
    assert (labels([a], ct) == per_window).mean() < 0.9  # the ensemble is not model a


def test_mirroring_tta_makes_the_prediction_mirror_equivariant(checkpoints, ct,
                                                               tmp_path: Path) -> None:
    a, _ = checkpoints
    img = nib.load(ct)
    mirrored = tmp_path / "mirrored.nii.gz"  # the anatomy mirrored, the affine kept
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header),
             mirrored)
    with_tta = (labels([a], mirrored, tta="mirror") == labels([a], ct, tta="mirror")[::-1]).mean()
    without = (labels([a], mirrored) == labels([a], ct)[::-1]).mean()
    assert with_tta >= 0.9999, with_tta
    assert without < 0.99, without  # a random network is not symmetric: TTA does the work


def test_mean_probabilities_average_in_probability_space() -> None:
    logits = [torch.randn(2, 4, 3, 3, 3) for _ in range(2)]
    runners = [lambda w, x=x: x.clone() for x in logits]  # a new output per call
    out = MeanProbabilities(runners)(torch.zeros(2, 1, 3, 3, 3))
    expected = (torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1)) / 2
    assert torch.allclose(out.exp(), expected, atol=1e-6)
    assert len(mirror_flips([0, 1, 2])) == 8 and mirror_flips([2]) == [(), (4,)]
    with pytest.raises(ConfigError, match="tta_axes"):
        mirror_flips([3])


def test_a_multirun_folder_gives_each_runs_best_checkpoint(tmp_path: Path) -> None:
    for fold in range(3):
        checkpoints = tmp_path / "cv" / str(fold) / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "last.ckpt").write_bytes(b"x")
        if fold != 1:
            (checkpoints / "epoch_004.ckpt").write_bytes(b"x")
    found = run_checkpoints(tmp_path / "cv")
    assert [p.relative_to(tmp_path / "cv").as_posix() for p in found] == [
        "0/checkpoints/epoch_004.ckpt", "1/checkpoints/last.ckpt", "2/checkpoints/epoch_004.ckpt"]


def test_predict_cli_takes_a_list_of_checkpoints(checkpoints, ct, tmp_path: Path) -> None:
    a, _ = checkpoints
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt=[{a},{a}]",
                           f"input={ct}", f"output={tmp_path / 'out'}", "masks=false",
                           "progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = np.asanyarray(nib.load(tmp_path / "out" / "ct" / "labels.nii.gz").dataobj)
    assert np.array_equal(written, labels([a], ct))
    assert "averaging the probabilities of 2 model(s) x 1 mirroring(s)" in done.stderr + done.stdout


@pytest.fixture(scope="module")
def vista3d_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random-weight small VISTA3D checkpoints (seeds 0 and 1) at the crop's 3 mm."""
    folder = tmp_path_factory.mktemp("vista3d_ensemble")
    data = {"version": "v1", "spacing": 3.0, "intensity": "hu_window", "smooth_sigma": 0.0,
            "patch_size": list(ROI)}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                            roi_size=ROI)
        paths.append(save_lightning_checkpoint(net, folder / f"v{seed}.ckpt", data))
    return tuple(paths)


def test_vista3d_ensembles_and_tta_average_the_class_sigmoids(vista3d_checkpoints, ct,
                                                             tmp_path: Path) -> None:
    a, b = vista3d_checkpoints
    single = labels([a], ct)
    assert len(np.unique(single)) > 3
    assert np.array_equal(labels([a, a], ct), single)  # [a, a] is a
    assert (labels([a, b], ct) == single).mean() < 0.99  # b takes part
    img = nib.load(ct)
    mirrored = tmp_path / "mirrored.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header),
             mirrored)
    with_tta = (labels([a], mirrored, tta="mirror") == labels([a], ct, tta="mirror")[::-1]).mean()
    assert with_tta >= 0.9999, with_tta
    with pytest.raises(ConfigError, match="clicks"):
        labels([a], ct, tta="mirror", prompt=Prompt(points=((10, 10, 10),), point_labels=(1,)))
    other = checkpoints_of_segresnet(tmp_path)
    with pytest.raises(ConfigError, match="other architecture"):
        check_members([load_model(m, {}, {}) for m in (a, other)], [str(a), str(other)])


def checkpoints_of_segresnet(folder: Path) -> Path:
    """A random slim SegResNet checkpoint of the same classes and grid."""
    data = {"version": "v1", "spacing": 3.0, "intensity": "segresnet", "patch_size": list(ROI)}
    return save_lightning_checkpoint(module(0), folder / "segresnet.ckpt", data)


def test_mean_sigmoids_is_the_logit_of_the_mean_class_probability() -> None:
    logits = [torch.randn(2, 5, 3, 3, 3) * 4 for _ in range(3)]
    runners = [lambda w, x=x: x.clone() for x in logits]  # a new output per call
    out = MeanSigmoids(runners)(torch.zeros(2, 1, 3, 3, 3))
    mean = sum(torch.sigmoid(x[:, 1:]) for x in logits) / 3
    assert torch.allclose(torch.sigmoid(out[:, 1:]), mean, atol=1e-6)
    assert torch.equal(out[:, :1], torch.zeros_like(out[:, :1]))  # VISTA3D's background
    one = MeanSigmoids(runners[:1])(torch.zeros(2, 1, 3, 3, 3))
    assert torch.allclose(one[:, 1:], logits[0][:, 1:], atol=1e-4)
