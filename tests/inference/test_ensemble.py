"""Fold ensembles and mirroring TTA in prediction: the window logits of every member and mirroring
averaged in order (nnU-Net v2's folds and mirrorings), so [a, a] predicts exactly what a does, two
trained members what MONAI's own sliding-window inferer run per member with the logits averaged
gives, and with tta=mirror the prediction of a mirrored CT is the mirrored prediction; VISTA3D's
ensembles average its class logits the same way."""

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
from monai.transforms import LoadImage, Orientation, Spacing

from ctseg.data.phantoms import write_phantoms
from ctseg.errors import ConfigError
from ctseg.inference.ensemble import MeanLogits, check_members, mirror_flips, run_checkpoints
from ctseg.inference.inputs import Case
from ctseg.inference.pipeline import IMAGE, CasePredictor, PredictOptions
from ctseg.inference.prompts import Prompt
from ctseg.inference.runner import run
from ctseg.labels import label_names
from ctseg.models.loading import load_model
from ctseg.models.segresnet import SegResNetModule
from ctseg.models.vista3d import VISTA3DModule
from ctseg.models.weights import read_checkpoint

ROI = (32, 32, 32)
OPTIONS = {"device": "cpu", "masks": False, "overlap": 0.25}


def module(seed: int) -> SegResNetModule:
    """A random-weight slim 105-class SegResNet."""
    torch.manual_seed(seed)
    return SegResNetModule(num_classes=105, label_names=label_names("v1"), init_filters=8,
                           roi_size=ROI)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint at the shared crop's own 3 mm, so the model grid is the CT's."""
    data = {"version": "v1", "spacing": 3.0, "intensity": "segresnet", "patch_size": list(ROI)}
    return save_lightning_checkpoint(module(0), tmp_path_factory.mktemp("ensemble") / "m0.ckpt",
                                     data)


@pytest.fixture(scope="module")
def ct(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared crop cut to 56 x 56 x 30 voxels: with 32-voxel windows and overlap 0.25 the
    window grid is symmetric, so a mirrored CT meets mirrored windows."""
    img = nib.load(shared_ct)
    data = np.asanyarray(img.dataobj)[33:89, 22:78, :]
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return path


@pytest.fixture(scope="module")
def ct_80(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 80 x 80 x 64 CT at 3 mm: the centre of the shared crop, its 30 slices, the same mirrored,
    then its first 4 again."""
    img = nib.load(shared_ct)
    data = np.asanyarray(img.dataobj)[21:101, 10:90, :]
    data = np.concatenate([data, data[:, :, ::-1], data[:, :, :4]], axis=2)
    path = tmp_path_factory.mktemp("ct_80") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return path


@pytest.fixture(scope="module")
def members_ct(ensemble_members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom the trained members did not train on (their phantoms' shape, the next seed),
    resampled (MONAI, RAS) to their grid, so their model grid is the CT's."""
    data = read_checkpoint(ensemble_members[0])["datamodule_hyper_parameters"]
    root = tmp_path_factory.mktemp("members_ct")
    write_phantoms(root / "phantom", 1, seed=data["phantom_seed"] + 1,
                   shape=tuple(data["phantom_shape"]))
    image = LoadImage(image_only=True, ensure_channel_first=True)(
        str(next((root / "phantom").glob("*/ct.nii.gz"))))
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    image = Spacing(pixdim=data["spacing"], mode="bilinear")(image)
    nib.save(nib.Nifti1Image(np.rint(image[0].numpy()).astype(np.int16),
                             np.asarray(image.affine)), root / "ct.nii.gz")
    return root / "ct.nii.gz"


def labels(models: list, ct: Path, **options) -> np.ndarray:
    """The label map predict.py writes for `ct` with the first model and the others as members."""
    loaded = [load_model(m, {}, {}) for m in models]
    with CasePredictor(loaded[0], PredictOptions(**OPTIONS, **options), loaded[1:]) as p:
        return p.segment(Case("ct", ct, "nifti")).labels


def test_an_ensemble_of_one_model_twice_predicts_exactly_what_the_model_does(checkpoint, ct_80,
                                                                             tmp_path) -> None:
    """predict.py's runner (its CLI with `ckpt=[a,a]`, in process with `ckpt=a`): the same labels
    and probabilities bit for bit. The mean of probabilities this replaced moved 2 of these
    409600 labels with one thread per process (CI's) and the probabilities' last bits always."""
    a = checkpoint
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt=[{a},{a}]",
                           f"input={ct_80}", f"output={tmp_path / 'two'}", "masks=false",
                           "probabilities=[liver]", "progress=false", "device=cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run({"ckpt": str(a), "input": str(ct_80), "output": str(tmp_path / "one"),
                "masks": False, "probabilities": ["liver"], "progress": False,
                "device": "cpu"}) == 0
    two, one = ([np.asanyarray(nib.load(tmp_path / name / "ct" / file).dataobj)
                 for file in ("labels.nii.gz", "probabilities/liver.nii.gz")]
                for name in ("two", "one"))
    assert one[0].shape == (80, 80, 64)
    assert np.array_equal(two[0], one[0])
    assert np.array_equal(two[1], one[1])
    assert len(np.unique(one[0])) > 5  # a map with many classes, not a constant
    assert "averaging the logits of 2 model(s) x 1 mirroring(s)" in done.stderr + done.stdout


def test_an_ensemble_equals_monais_inferer_per_member_with_the_logits_averaged(
        ensemble_members, members_ct) -> None:
    a, b = ensemble_members
    ours = labels([a, b], members_ct)
    models = [load_model(m, {}, {}) for m in (a, b)]
    with CasePredictor(models[0], PredictOptions(**OPTIONS)) as predictor:
        image = predictor.prepare(Case("ct", members_ct, "nifti")).data[IMAGE][None].as_tensor()
    assert image.shape[2:] == ours.shape  # the CT's own grid: no resampling to undo
    # predict.py's window, overlap, blend and padding of SegResNet, each member blended over the
    # whole volume by MONAI, then the logits averaged (nnU-Net v2's folds)
    inferer = SlidingWindowInferer(models[0].roi_size, sw_batch_size=1, overlap=0.25,
                                   mode="gaussian", padding_mode="replicate")
    with torch.no_grad():
        logits = [inferer(image, m.net.eval()) for m in models]
    reference = ((logits[0] + logits[1]) / 2).argmax(1)[0].numpy()
    first = logits[0].argmax(1)[0].numpy()
    # Equal in exact arithmetic (the blend is linear): only the order of float additions differs.
    # Measured: every voxel of the 33 x 33 x 31 phantom (8 windows) equal.
    assert (ours == reference).mean() >= 0.999
    # The members segment structures and differ: the first alone misses the threshold (measured
    # 99.15 %; its 4 structures against background).
    assert len(np.unique(reference)) >= 4
    assert (first == reference).mean() < 0.999


def test_mirroring_tta_makes_the_prediction_mirror_equivariant(checkpoint, ct,
                                                               tmp_path: Path) -> None:
    a = checkpoint
    img = nib.load(ct)
    mirrored = tmp_path / "mirrored.nii.gz"  # the anatomy mirrored, the affine kept
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header),
             mirrored)
    with_tta = (labels([a], mirrored, tta="mirror") == labels([a], ct, tta="mirror")[::-1]).mean()
    without = (labels([a], mirrored) == labels([a], ct)[::-1]).mean()
    assert with_tta >= 0.9999, with_tta
    assert without < 0.99, without  # a random network is not symmetric: TTA does the work


def test_mean_logits_sum_in_order_and_divide_once() -> None:
    logits = [torch.randn(2, 5, 4, 4, 4) for _ in range(3)]
    runners = [lambda w, x=x: x.clone() for x in logits]  # a new output per call
    windows = torch.randn(2, 1, 4, 4, 4)
    assert torch.equal(MeanLogits(runners)(windows), (logits[0] + logits[1] + logits[2]) / 3)
    assert torch.equal(MeanLogits(runners[:1] * 2)(windows), logits[0])  # (l + l) / 2 == l
    # VISTA3D's windows: a constant 0 background channel, kept 0 by the mean
    zero = [lambda w, x=x: torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], 1) for x in logits]
    assert not MeanLogits(zero)(windows)[:, 0].any()
    # a mirrored pass is mirrored back: a runner that adds a ramp along the last axis
    ramp = torch.arange(4.0).expand(2, 1, 4, 4, 4)
    out = MeanLogits([lambda w: w + ramp], [(), (4,)])(windows)
    assert torch.allclose(out, windows + (ramp + ramp.flip(4)) / 2)
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


def test_vista3d_ensembles_and_tta_average_the_class_logits(vista3d_checkpoints, ct,
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

