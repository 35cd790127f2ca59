"""Bad input to every command line, as real processes: exit 1, exactly one `error:` line that
names the file or key, no traceback, and nothing created where the command would have written.

The matrix: predict.py (20 cases), train.py (9), python -m ctseg.hparams_search (2),
ctseg.data (3), ctseg.evaluate (4), ctseg.evaluate.interactive (6), ctseg.visualize (5),
ctseg.export (4), ctseg.compare (3): 56 cases x 9 command lines. Every command that reads a file
meets it missing, empty and truncated. Other weights that do not fit, and checkpoints naming a
class outside ctseg, are tests/models/test_loading.py's (in-process: the same CtsegError makes
the one line).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from command_server import CommandServer
from helpers import REPO, SHARED_DATA, save_checkpoint, truncate
from monai.networks.nets import SegResNet

from ctseg.labels import label_names
from ctseg.models.segresnet import SegResNetModule
from ctseg.models.vista3d import VISTA3DModule

pytestmark = pytest.mark.slow
CROP = SHARED_DATA / "totalseg_mini"
V2_MAP = CROP / "s0001" / "label_totalseg_v2.nii.gz"
USER_ENV = {k: v for k, v in os.environ.items() if not k.startswith("CTSEG_")}


def checkpoint(path: Path, num_classes: int = 105) -> Path:
    """A tiny random SegResNet checkpoint (8 filters, 4 mm, v1 data)."""
    torch.manual_seed(0)
    names = label_names("v1") if num_classes == 105 else None
    module = SegResNetModule(num_classes=num_classes, label_names=names, init_filters=8,
                             roi_size=(32, 32, 32))
    return save_checkpoint(module, path, {"version": "v1", "spacing": 4.0,
                                          "intensity": "segresnet", "patch_size": [32, 32, 32]})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommandServer]:
    """Runs each `python <args>` as a process forked from one that has imported the heavy
    libraries (tests/command_server.py), with the environment of a user who set no ctseg
    variable."""
    started = CommandServer(REPO, USER_ENV, tmp_path_factory.mktemp("server") / "server.log")
    yield started
    started.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good and broken inputs: a checkpoint, one of 118 classes, a tiny VISTA3D checkpoint, a
    bundle-style SegResNet state dict of 50 classes, the crop's CT, an empty, a truncated and a
    singular-affine NIfTI, a regular file to put outputs under, prediction folders with a
    truncated and an empty label map, a DICOM folder holding a file that is not DICOM, a run
    folder with a broken config.yaml and one with a broken metrics.csv."""
    d = tmp_path_factory.mktemp("bad_inputs")
    checkpoint(d / "tiny.ckpt")
    checkpoint(d / "classes118.ckpt", num_classes=118)
    vista3d = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                            roi_size=(8, 8, 8))
    save_checkpoint(vista3d, d / "vista3d.ckpt", {"version": "v1", "spacing": 12.0,
                                                  "intensity": "hu_window", "patch_size": [8] * 3})
    torch.save(SegResNet(spatial_dims=3, init_filters=8, out_channels=50).state_dict(),
               d / "classes50.pt")
    shutil.copy(d / "tiny.ckpt", d / "truncated.ckpt")
    truncate(d / "truncated.ckpt")
    ct = CROP / "s0001" / "ct.nii.gz"
    shutil.copy(ct, d / "ct.nii.gz")
    (d / "empty.nii.gz").write_bytes(b"")
    shutil.copy(ct, d / "truncated.nii.gz")
    truncate(d / "truncated.nii.gz")
    img = nib.load(ct)
    singular = nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header.copy())
    affine = img.affine.copy()
    affine[2, :3] = 0
    singular.header.set_sform(affine, code=1)
    singular.header.set_qform(None, code=0)
    nib.save(singular, d / "singular.nii.gz")
    (d / "a_file").write_text("not a folder\n")
    (d / "pred" / "s0001").mkdir(parents=True)
    shutil.copy(d / "truncated.nii.gz", d / "pred" / "s0001" / "labels.nii.gz")
    (d / "pred_empty" / "s0001").mkdir(parents=True)
    (d / "pred_empty" / "s0001" / "labels.nii.gz").write_bytes(b"")
    (d / "liver_only" / "segmentations").mkdir(parents=True)
    shutil.copy(ct, d / "liver_only" / "ct.nii.gz")
    shutil.copy(CROP / "s0001" / "segmentations" / "liver.nii.gz",
                d / "liver_only" / "segmentations")
    (d / "dicom").mkdir()
    (d / "dicom" / "IM0001.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    for name, config, metrics in (("runs_yaml", "a: [unclosed\n", "epoch,val/mean_dice\n0,0.5\n"),
                                  ("runs_csv", "seed: 1\n", "epoch,val/mean_dice\n0,abc\n")):
        (d / name / "r1" / "checkpoints").mkdir(parents=True)
        (d / name / "r1" / "checkpoints" / "config.yaml").write_text(config)
        (d / name / "r1" / "csv" / "version_0").mkdir(parents=True)
        (d / name / "r1" / "csv" / "version_0" / "metrics.csv").write_text(metrics)
    return d


@dataclass(frozen=True)
class Case:
    """A command (`{d}`: the inputs' folder, `{o}`: a fresh output folder), what its error line
    says, and glob patterns (under `{o}` or `{d}`) that must match nothing afterwards."""

    command: str
    says: str
    absent: tuple[str, ...] = ("{o}/*",)
    limit_kb: int | None = None  # ulimit -f for the process
    outside: bool = False  # run from `{o}` (a user's folder outside the clone), not the clone


PREDICT = "predict.py ckpt={d}/tiny.ckpt input={d}/ct.nii.gz output={o}/pred"
TRAIN = "train.py paths.log_dir={o}/logs paths.data_dir={d}/data"
INTERACTIVE = ("-m ctseg.evaluate.interactive ckpt={d}/vista3d.ckpt gt={d}/liver_only "
               "output={o}/clicks")
LIVER = f"{INTERACTIVE} structures=[liver]"
CASES = {
    "predict: checkpoint of another class count": Case(
        "predict.py ckpt={d}/classes118.ckpt input={d}/ct.nii.gz output={o}/pred",
        "classes118.ckpt: the checkpoint's hyper_parameters give 118 classes but "
        "TotalSegmentator v1 has 105"),
    "predict: bundle state dict of another class count": Case(
        "predict.py ckpt={d}/classes50.pt input={d}/ct.nii.gz output={o}/pred",
        "classes50.pt: the weights have 50 output classes but the model config (model.num_classes "
        "/ data.version) expect 105; a bare state dict takes its classes from data.version"),
    "predict: device=cuda without CUDA": Case(f"{PREDICT} device=cuda", "device=cuda: CUDA is "
                                              "not available on this machine"),
    "predict: unknown probabilities name": Case(f"{PREDICT} probabilities=[no_such_organ]",
                                                "probabilities: unknown structure"),
    "predict: sw.overlap=abc": Case(f"{PREDICT} sw.overlap=abc", "sw.overlap=abc: expected a "
                                    "number"),
    "predict: sw.overlap out of range": Case(f"{PREDICT} sw.overlap=1.5", "sw.overlap=1.5: the "
                                             "windows' overlap is a fraction in [0, 1)"),
    "predict: sw.mode unknown": Case(f"{PREDICT} sw.mode=median", "sw.mode=median: choose "
                                     "gaussian or constant"),
    "predict: missing input": Case("predict.py ckpt={d}/tiny.ckpt input={d}/nope.nii.gz "
                                   "output={o}/pred", "nope.nii.gz: input not found"),
    "predict: empty input": Case("predict.py ckpt={d}/tiny.ckpt input={d}/empty.nii.gz "
                                 "output={o}/pred", "empty.nii.gz: corrupt or unreadable NIfTI",
                                 ("{o}/pred/empty",)),
    "predict: truncated input": Case("predict.py ckpt={d}/tiny.ckpt input={d}/truncated.nii.gz "
                                     "output={o}/pred", "truncated.nii.gz: corrupt or truncated "
                                     "NIfTI", ("{o}/pred/truncated",)),
    "predict: singular affine": Case("predict.py ckpt={d}/tiny.ckpt input={d}/singular.nii.gz "
                                     "output={o}/pred", "singular.nii.gz: invalid voxel-to-world "
                                     "affine", ("{o}/pred/singular",)),
    "predict: output under a regular file": Case("predict.py ckpt={d}/tiny.ckpt "
                                                 "input={d}/ct.nii.gz output={d}/a_file/pred",
                                                 "a_file/pred", ("{d}/a_file/pred",)),
    "predict: file-size limit while writing": Case(
        PREDICT, "pred/ct: cannot write (File too large); free disk space, raise the file-size "
        "limit", ("{o}/pred/ct",), limit_kb=16),
    "predict: missing checkpoint": Case("predict.py ckpt={d}/nope.ckpt input={d}/ct.nii.gz "
                                        "output={o}/pred", "nope.ckpt: checkpoint not found"),
    "predict: empty checkpoint": Case("predict.py ckpt={d}/empty.nii.gz input={d}/ct.nii.gz "
                                      "output={o}/pred", "empty.nii.gz: cannot read the "
                                      "checkpoint"),
    "predict: truncated checkpoint": Case("predict.py ckpt={d}/truncated.ckpt "
                                          "input={d}/ct.nii.gz output={o}/pred",
                                          "truncated.ckpt: cannot read the checkpoint"),
    "predict: DICOM folder without a DICOM file": Case(
        "predict.py ckpt={d}/tiny.ckpt input={d}/dicom output={o}/pred",
        "dicom: empty input folder: no NIfTI files (.nii/.nii.gz), no DICOM files"),
    "predict: no input=": Case("predict.py ckpt={d}/tiny.ckpt output={o}/pred",
                               "input= is missing: this command needs it on the command line"),
    "predict: no output=": Case("predict.py ckpt={d}/tiny.ckpt input={d}/ct.nii.gz",
                                "output= is missing: this command needs it on the command line",
                                ("{o}/*", "{r}/.predict_logs")),
    "train: misspelt config option": Case(
        f"{TRAIN} model=segresnt_small", "Available options in 'model': segresnet, "
        "segresnet_small, vista3d, vista3d_small; did you mean segresnet_small?"),
    "train: default run outside the clone, no crop": Case(
        "{r}/train.py", "data.extra_roots: {shared}/data/totalseg_mini is not a folder. The "
        "embedded default adds the real crop from ../shared/data beside the clone: run from the "
        "clone, set CTSEG_SHARED_DATA to the folder holding totalseg_mini, or train on the "
        "phantoms only with data.extra_roots=[]", outside=True),
    "predict: unknown key": Case(f"{PREDICT} sw.overlaps=0.5", "Could not override "
                                 "'sw.overlaps'"),
    "train: data.spacing=-1": Case(f"{TRAIN} data.spacing=-1", "data.spacing=-1: values must be "
                                   "finite and > 0"),
    # Checked as composed, before any work: no run folder and no phantoms written.
    "train: data.spacing=abc": Case(f"{TRAIN} data.spacing=abc", "data.spacing='abc': must be a "
                                    "number > 0, or three numbers (one per axis)",
                                    ("{o}/*", "{d}/data/phantoms")),
    # Its recorded class is checked before the run folder gets files (the weights could not load).
    "train: resume a VISTA3D checkpoint under the default SegResNet config": Case(
        f"{TRAIN} ckpt_path={{d}}/vista3d.ckpt", "vista3d.ckpt: a checkpoint of "
        "ctseg.models.vista3d.VISTA3DModule, but the config builds SegResNetModule "
        "(model._target_); resume it with the settings it was trained with: ckpt_path=<its run "
        "folder>, or choose its model: model=vista3d or model=vista3d_small"),
    "train: sw.batch_size=auto": Case(f"{TRAIN} sw.batch_size=auto", "sw.batch_size=auto: "
                                      "validation and test in train.py take a number of windows"),
    "train: pretrained weights of another architecture": Case(
        f"{TRAIN} model.pretrained={{d}}/tiny.ckpt", "tiny.ckpt: weights do not fit the network "
        "architecture"),
    "train: log folder under a regular file": Case(
        "train.py paths.log_dir={d}/a_file/logs paths.data_dir={d}/data", "a_file/logs",
        ("{d}/a_file/logs",)),
    "train: dataset root without meta.csv": Case(
        f"{TRAIN} data=totalseg_v1 data.root={{d}}/nope", "nope/meta.csv: meta.csv not found; "
        "is this the root of a TotalSegmentator download"),
    "hparams_search: n_trials=0": Case(
        "-m ctseg.hparams_search hparams_search=optuna experiment=phantom_quick "
        "hparams_search.n_trials=0 paths.log_dir={o}/logs paths.data_dir={d}/data",
        "hparams_search.n_trials=0: the number of finished trials to reach must be"),
    "hparams_search: every trial fails on a user error": Case(
        "-m ctseg.hparams_search hparams_search=optuna experiment=phantom_quick "
        "hparams_search.n_trials=2 paths.log_dir={o}/logs paths.data_dir={d}/data "
        "model.pretrained={d}/empty.nii.gz", "empty.nii.gz: cannot read the pretrained weights",
        ("{o}/logs/**/trial_0/checkpoints/*.ckpt", "{o}/logs/**/trial_1")),
    "data prepare: missing root": Case("-m ctseg.data prepare {d}/nope --out {o}/prepared",
                                       "nope: folder not found; a dataset root is"),
    "data check: missing root": Case("-m ctseg.data check {d}/nope",
                                     "nope: folder not found; a dataset root is"),
    "data prepare: --out under a regular file": Case(
        f"-m ctseg.data prepare {CROP} --out {{d}}/a_file/prepared",
        "a_file/prepared/v1: cannot write (Not a directory)", ("{d}/a_file/prepared",)),
    "evaluate: truncated prediction": Case(
        f"-m ctseg.evaluate pred={{d}}/pred gt={CROP} output={{o}}/evaluation",
        "pred/s0001/labels.nii.gz: corrupt or truncated NIfTI"),
    "evaluate: empty prediction": Case(
        f"-m ctseg.evaluate pred={{d}}/pred_empty gt={CROP} output={{o}}/evaluation",
        "pred_empty/s0001/labels.nii.gz: corrupt or truncated NIfTI"),
    "evaluate: missing prediction folder": Case(
        f"-m ctseg.evaluate pred={{d}}/nope gt={CROP} output={{o}}/evaluation",
        "pred={d}/nope: no such folder"),
    "evaluate: missing ground truth": Case(
        "-m ctseg.evaluate pred={d}/pred gt={d}/nope output={o}/evaluation",
        "gt={d}/nope: no such folder"),
    "interactive: SegResNet checkpoint": Case(
        f"{LIVER.replace('vista3d.ckpt', 'tiny.ckpt')}",
        "interactive evaluation needs a VISTA3D checkpoint"),
    "interactive: a structure the ground truth lacks": Case(
        f"{INTERACTIVE} structures=[liver,spleen]",
        "liver_only/segmentations/spleen.nii.gz: the ground truth lacks spleen"),
    "interactive: a structure VISTA3D has no id for": Case(
        f"{INTERACTIVE} structures=[heart_myocardium]",
        "structures: VISTA3D has no id for 'heart_myocardium'"),
    "interactive: click budget below one": Case(f"{LIVER} clicks=0",
                                                "clicks must be an integer >= 1"),
    "interactive: missing ground truth": Case(f"{LIVER.replace('liver_only', 'nope')}",
                                              "gt={d}/nope: no such folder"),
    "interactive: clicks_from without clicks": Case(f"{LIVER} clicks_from={{d}}",
                                                    "clicks_from={d}: no clicks/ folder"),
    "visualize: truncated CT": Case(
        f"-m ctseg.visualize ct={{d}}/truncated.nii.gz labels={V2_MAP} version=v2 "
        "out={o}/overlay.png", "truncated.nii.gz: cannot read the CT's voxels"),
    "visualize: missing CT": Case(
        f"-m ctseg.visualize ct={{d}}/nope.nii.gz labels={V2_MAP} version=v2 "
        "out={o}/overlay.png", "nope.nii.gz: no such file (the CT)"),
    "visualize: empty label map": Case(
        "-m ctseg.visualize ct={d}/ct.nii.gz labels={d}/empty.nii.gz version=v2 "
        "out={o}/overlay.png", "empty.nii.gz: cannot read the label map as NIfTI"),
    "visualize: output under a regular file": Case(
        f"-m ctseg.visualize ct={{d}}/ct.nii.gz labels={V2_MAP} version=v2 "
        "out={d}/a_file/overlay.png", "a_file/overlay.png: cannot write", ("{d}/a_file/*",)),
    "visualize: singular affine": Case(
        f"-m ctseg.visualize ct={{d}}/singular.nii.gz labels={V2_MAP} version=v2 "
        "out={o}/overlay.png", "singular.nii.gz"),
    "export: truncated checkpoint": Case("-m ctseg.export ckpt={d}/truncated.ckpt "
                                         "output={o}/export", "truncated.ckpt: cannot read the "
                                         "checkpoint"),
    "export: missing checkpoint": Case("-m ctseg.export ckpt={d}/nope.ckpt output={o}/export",
                                       "nope.ckpt: checkpoint not found"),
    "export: empty checkpoint": Case("-m ctseg.export ckpt={d}/empty.nii.gz output={o}/export",
                                     "empty.nii.gz: cannot read the checkpoint"),
    "export: output under a regular file": Case("-m ctseg.export ckpt={d}/tiny.ckpt "
                                                "output={d}/a_file/export", "a_file/export",
                                                ("{d}/a_file/export",)),
    "compare: missing runs folder": Case("-m ctseg.compare {d}/nope --out {o}/compare",
                                         "nope: no such folder"),
    "compare: broken config.yaml": Case("-m ctseg.compare {d}/runs_yaml --out {o}/compare",
                                        "runs_yaml/r1/checkpoints/config.yaml: cannot read the "
                                        "run's config (YAML)"),
    "compare: broken metrics.csv": Case("-m ctseg.compare {d}/runs_csv --out {o}/compare",
                                        "runs_csv/r1/csv: a metrics.csv value is not a number"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_creates_nothing(name, files, server, tmp_path):
    case = CASES[name]
    out = tmp_path / "out"
    fill = {"d": str(files), "o": str(out), "r": str(REPO), "shared": str(tmp_path / "shared")}
    if "device=cuda" in case.command and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = case.command.format(**fill).split()
    if case.outside:
        out.mkdir()
    cwd = out if case.outside else REPO
    if case.limit_kb:
        argv = ["bash", "-c", f'ulimit -f {case.limit_kb}; exec "$@"', "bash", sys.executable,
                *args]
        result = subprocess.run(argv, cwd=cwd, env=USER_ENV, capture_output=True, text=True,
                                timeout=600)
    else:
        result = server.run(args, cwd, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert "Error executing job" not in result.stderr, result.stderr[-3000:]
    assert case.says.format(**fill) in errors[0], errors[0]
    for pattern in case.absent:
        found = Path("/").glob(pattern.format(**fill).lstrip("/"))
        assert not list(found), (pattern, sorted(out.rglob("*")))
