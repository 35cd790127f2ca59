"""Every command that the README, docs/ and the --help texts show, run as typed.

Each command runs as a real subprocess from a copy of the clone (`<tmp>/ctseg`, with the shared
data beside it as `../shared`, as a user has it), with the environment of a fresh user: no ctseg
variable set, HOME in the temporary folder. A command's documented placeholders (`<run>`,
`/data/Totalsegmentator_dataset`, `ct.nii.gz`, ...) are replaced by what the embedded data gives
(`PLACEHOLDERS`), and only size-shrinking overrides are appended (epochs, steps, phantom count and
shape, trials). Commands that need a download, a GPU, a database server or a cluster are listed in
`PLAN` with the reason they do not run here. A command added to the documentation fails
`test_every_documented_command_is_planned` until it is planned here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import optuna
import pytest
import torch
from command_server import CommandServer
from helpers import REPO, SHARED_DATA, metric_rows, write_dicom_series
from omegaconf import OmegaConf

from ctseg.data.phantoms import phantom_defaults

pytestmark = pytest.mark.slow

# Lines that start with one of these are ctseg commands.
PROGRAMS = re.compile(r"^(python (train|predict)\.py|python -m ctseg\.|torchrun |ctseg-)")
# The documents whose fenced code blocks hold commands, and the commands that print help texts.
DOCUMENTS = ("README.md", "docs")
HELP = (
    "python train.py --help", "python predict.py --help", "python -m ctseg.evaluate --help",
    "python -m ctseg.export --help", "python -m ctseg.visualize --help",
    "python -m ctseg.compare --help", "python -m ctseg.data --help",
    "python -m ctseg.hparams_search --help", "python -m ctseg.evaluate.interactive --help",
)

# Size-shrinking overrides of a training run: one epoch of two steps (validated, so that it
# checkpoints), few and small phantoms.
TRAIN = ("trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
         "trainer.limit_train_batches=2", "data.n_phantoms=8", "data.phantom_shape=[24,24,16]",
         "data.patch_size=[16,16,16]")
# The README's first command, `python train.py`, runs the default recipe as it is (1,000 steps,
# about 3 minutes): the run that the README's figures describe and the later commands read.
# Resuming it: one epoch more (a second resume of the same folder: one more again), in its
# folder; its 1,000 steps are 100 epochs of 10.
RESUME = ("trainer.max_epochs=101",)
RESUME_AGAIN = ("trainer.max_epochs=102",)
DEFAULT_RUN_STEPS_PER_EPOCH = 10
# Resuming `python train.py experiment=phantom_quick` (shrunk by TRAIN: 1 epoch of 2 steps) from
# its folder: one epoch more.
PHANTOM_RESUME = "python train.py ckpt_path=outputs/phantom_quick/runs/<run>"
SEARCH = ("hparams_search.n_trials=2", *TRAIN)

# README.md, the first paragraph: `python train.py`'s held-out test Dice (3 test phantoms; lungs:
# the mean of the two lower lobes), from one thread (the suite's) to two, asserted within 0.05 of
# the range.
DEFAULT_RUN_DICE = {"mean": (0.73, 0.78), "liver": (0.90, 0.91), "spleen": (0.77, 0.82),
                    "lungs": (0.89, 0.91), "pancreas": (0.24, 0.39)}
# README.md, "Quickstart": its checkpoint segments these structures of the crop (training data)
# with Dice 0.65-0.85 against the crop's own masks, asserted within 0.05 of the range.
CROP_STRUCTURES = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "colon",
                   "autochthon_right", "autochthon_left")
CROP_DICE = (0.65, 0.85)

CROP = "../shared/data/totalseg_mini"
CT = f"{CROP}/s0001/ct.nii.gz"
# Documented placeholder -> what the embedded data gives; `{name}` fields come from `Workspace`.
PLACEHOLDERS = {
    "/data/Totalsegmentator_dataset": CROP,
    "outputs/train/runs/<date_time_id>": "outputs/train/runs/{train}",
    "outputs/train/runs/<run>": "outputs/train/runs/{train}",
    "outputs/train/runs/2026-11-26_10-00-00": "outputs/train/runs/{train}",
    "outputs/train/runs/<a> outputs/train/runs/<b>":
        "outputs/train/runs/{train} outputs/train/runs/{train_b}",
    "ckpt=<run>/": "ckpt=outputs/train/runs/{train}/",
    "ckpt=last.ckpt": "ckpt=outputs/train/runs/{train}/checkpoints/last.ckpt",
    "ckpt_path=/path/to/epoch_010.ckpt": "ckpt_path=outputs/train/runs/{train}/checkpoints/{best}",
    "ckpt=run/checkpoints/": "ckpt=outputs/vista3d_quick/runs/{vista}/checkpoints/",
    "ckpt=... input=... output=...":
        f"ckpt=outputs/vista3d_quick/runs/{{vista}}/checkpoints/last.ckpt input={CT} output=pred",
    "outputs/phantom_quick/multiruns/<name>": "outputs/phantom_quick/multiruns/{sweep}",
    "input=ct.nii.gz": f"input={CT}",
    "ct=scan.nii.gz labels=predictions/scan/": f"ct={CT} labels=predictions/s0001/",
    "ct=s0001/ct.nii.gz labels=s0001/": f"ct={CT} labels={CROP}/s0001/",
    "ct=ct.nii.gz labels=label_totalseg_v2": f"ct={CT} labels={CROP}/s0001/label_totalseg_v2",
    "gt=<folder of <case>.nii.gz label maps>": "gt={label_maps}",
    "/data/dicom/study": "dicom_study",
    "/data/Dataset017_BTCV": "data/phantoms_nnunet",
    "/shared/ctseg": "cluster_fs",
    "outputs/phantom_quick/runs/<run>/checkpoints/epoch_129.ckpt":
        "outputs/phantom_quick/runs/{phantom}/checkpoints/last.ckpt",
    "series_uid=1.2.840...": "series_uid={series_uid}",
    # after the longer placeholder starting with it
    "outputs/phantom_quick/runs/<run>": "outputs/phantom_quick/runs/{phantom}",
}


@dataclass(frozen=True)
class Run:
    """Run the command (placeholders replaced, `shrink` appended) and expect `files` (globs
    relative to the clone, with `{name}` fields) and `prints` in its output."""

    shrink: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    prints: tuple[str, ...] = ()
    fresh: bool = False  # in a clone of its own (it writes where other commands read)
    gpu: bool = False  # skipped without CUDA
    after: tuple[str, ...] = ()  # commands whose outputs it reads
    check: Callable[[Workspace], None] | None = None  # what its outputs must hold
    timeout_s: int = 900


@dataclass(frozen=True)
class Skip:
    """A command that cannot run here, and why."""

    reason: str


def default_run_figures(ws: Workspace) -> None:
    """The default run made its 1,000 steps and reached the README's held-out figures: test
    Dice on the 3 test phantoms within 0.05 of DEFAULT_RUN_DICE's ranges."""
    run = ws.clone / "outputs/train/runs" / ws.value("train")
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 1000
    rows = metric_rows(run)
    dice = {k.removeprefix("test/dice/"): float(v) for r in rows for k, v in r.items()
            if k.startswith("test/dice/") and v}
    measured = {"mean": float(next(r["test/mean_dice"] for r in rows if r.get("test/mean_dice"))),
                "lungs": (dice["lung_lower_lobe_left"] + dice["lung_lower_lobe_right"]) / 2,
                **{name: dice[name] for name in ("liver", "spleen", "pancreas")}}
    wrong = {k: round(measured[k], 3) for k, (low, high) in DEFAULT_RUN_DICE.items()
             if not low - 0.05 <= measured[k] <= high + 0.05}
    assert not wrong, f"stated {DEFAULT_RUN_DICE}, measured {measured}"


def resumed_elsewhere(ws: Workspace, run: Path) -> list[Path]:
    """Run folders other than `run` that a resume of `run` made (their recorded overrides set a
    ckpt_path in `run`; resuming a run in place rewrites its own overrides with ckpt_path)."""
    return [p for p in ws.clone.glob("outputs/*/runs/*") if p != run and any(
        line.startswith("- ckpt_path=") and run.name in line
        for line in (p / ".hydra/overrides.yaml").read_text().splitlines())]


def default_run_resumed_in_place(epochs: int) -> Callable[[Workspace], None]:
    """A check: the default run was resumed in its own folder, whose last.ckpt holds `epochs`
    epochs, and no other run folder was made for the resume."""

    def check(ws: Workspace) -> None:
        run = ws.clone / "outputs/train/runs" / ws.value("train")
        saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
        assert (saved["epoch"], saved["global_step"]) == (
            epochs - 1, epochs * DEFAULT_RUN_STEPS_PER_EPOCH)
        assert not resumed_elsewhere(ws, run)

    return check


def phantom_quick_resumed_in_place(ws: Workspace) -> None:
    """experiment=phantom_quick's shrunk run, resumed from its folder with one epoch more
    (trainer.max_epochs=2 appended), went on in that folder with the experiment's settings and
    its own shrink overrides, and its log names the one override the resume changed."""
    run = ws.clone / "outputs/phantom_quick/runs" / ws.value("phantom")
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 4)  # 2 epochs of 2 steps
    assert not resumed_elsewhere(ws, run)
    config = OmegaConf.load(run / "checkpoints/config.yaml")
    assert (config.task_name, config.data.extra_roots, config.data.n_phantoms,
            config.trainer.check_val_every_n_epoch) == ("phantom_quick", [], 8, 1)
    result = ws.results[PHANTOM_RESUME]
    changes = [line for line in (result.stdout + result.stderr).splitlines()
               if "resume changes" in line]
    assert len(changes) == 1 and changes[0].endswith(
        "resume changes trainer.max_epochs=2 (the run had trainer.max_epochs=1)"), changes


CLICKS_ALONE = ("python -m ctseg.evaluate.interactive ckpt=run/checkpoints/last.ckpt "
                "gt=/data/Totalsegmentator_dataset split=test structures=[liver,spleen] clicks=5 "
                "output=clicks_alone")
CLICKS_WITH_ID = ("python -m ctseg.evaluate.interactive ckpt=run/checkpoints/last.ckpt "
                  "gt=/data/Totalsegmentator_dataset split=test structures=[liver,spleen] clicks=5 "
                  "with_id=true clicks_from=clicks_alone output=clicks_with_id")


def clicks_replayed(ws: Workspace) -> None:
    """The evaluation with the structures' ids clicked where the one of clicks alone did."""
    alone, with_id = (json.loads((ws.clone / name / "clicks/s0001.json").read_text())
                      ["structures"] for name in ("clicks_alone", "clicks_with_id"))
    assert set(alone) == set(with_id) == {"liver", "spleen"}
    assert all(alone[s]["clicks"] == with_id[s]["clicks"] for s in alone)


# A console line of Hydra's job logging (the root logger's handler): [time][logger][LEVEL] - text
HYDRA_LINE = re.compile(r"^\[[\d\- :,]+\]\[([\w.]+)\]\[[A-Z]+\] - (.*)$")


def trained_once_per_line(ws: Workspace) -> None:
    """The default run reached the README's figures, and its console (stdout and stderr, as a
    user reads it) shows each log message on one line: Lightning's and ctseg's through the root
    logger's handler, none a second time through a handler of their own (`INFO: ...`)."""
    default_run_figures(ws)
    result = ws.results["python train.py"]
    lines = (result.stdout + result.stderr).splitlines()
    logged = [m.groups() for m in map(HYDRA_LINE.match, lines) if m]
    names = {name.split(".")[0] for name, _ in logged}
    assert {"lightning", "ctseg"} <= names, names
    for _, text in filter(lambda entry: entry[1], logged):
        shown = [line for line in lines if line.endswith(text)]
        assert len(shown) == sum(t == text for _, t in logged), shown


def labels_on_the_ct_grid(ws: Workspace) -> None:
    """predictions/ct/labels.nii.gz lies on the CT's grid, holds v1 class indices, and segments
    the structures the README names within 0.05 of its Dice range against the crop's masks."""
    crop = SHARED_DATA / "totalseg_mini/s0001"
    ct, labels = nib.load(crop / "ct.nii.gz"), nib.load(ws.clone / "predictions/ct/labels.nii.gz")
    assert labels.shape == ct.shape and np.allclose(labels.affine, ct.affine)
    predicted = np.asanyarray(labels.dataobj)
    assert 0 <= predicted.max() <= 104
    classes = {name: int(index) for index, name in json.loads(
        (SHARED_DATA.parent / "reference/totalseg_v1_classes.json").read_text()).items()}
    dice = {}
    for name in CROP_STRUCTURES:
        mask = np.asanyarray(nib.load(crop / "segmentations" / f"{name}.nii.gz").dataobj) > 0
        hit = predicted == classes[name]
        dice[name] = round(2 * float((mask & hit).sum()) / float(mask.sum() + hit.sum()), 3)
    low, high = CROP_DICE
    assert all(low - 0.05 <= d <= high + 0.05 for d in dice.values()), dice


def one_job_per_combination(ws: Workspace) -> None:
    """The lr x seed sweep ran four jobs, each with its own overrides and checkpoint."""
    sweep = ws.clone / "outputs/phantom_quick/multiruns" / ws.value("sweep")
    jobs = sorted(p.name for p in sweep.iterdir() if p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    overrides = {(sweep / j / ".hydra/overrides.yaml").read_text() for j in jobs}
    assert len(overrides) == 4 and all("model.optimizer.lr=" in o for o in overrides)


def two_finished_trials(ws: Workspace) -> None:
    """The search's SQLite study holds the two trials asked for, finished."""
    folder = ws.clone / "outputs/phantom_quick/optuna/phantom_quick"
    study = optuna.load_study(study_name="phantom_quick", storage=f"sqlite:///{folder}/study.db")
    states = [t.state for t in study.trials]
    assert len(states) == 2 and all(s.is_finished() for s in states), states


def seg_reads_back(ws: Workspace) -> None:
    """The DICOM SEG of the DICOM study reads back with highdicom, one segment or more."""
    seg = hd.seg.segread(ws.clone / "predictions/dicom_study/seg.dcm")
    assert len(seg.SegmentSequence) >= 1


DATASET_PREDICTION = ("python predict.py ckpt=<run>/checkpoints/last.ckpt "
                      "input=/data/Totalsegmentator_dataset output=predictions")
FIRST_PREDICTION = ("python predict.py "
                    "ckpt=outputs/train/runs/<date_time_id>/checkpoints/last.ckpt "
                    "input=../shared/data/totalseg_mini/s0001/ct.nii.gz output=predictions")
EXPORT = "python -m ctseg.export ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt output=export"
DOWNLOAD = "needs the TotalSegmentator download (the shared crop is one test subject, no training"
GPU = "a CUDA GPU"
CV_ON_PHANTOMS = "tests/evaluate/test_cross_validation.py runs the same on two phantom folds"
SEARCH_COMMAND = "python -m ctseg.hparams_search hparams_search=optuna experiment=phantom_quick"
NNUNET_PHANTOMS = ("python -m ctseg.data phantoms data/phantoms_nnunet --layout nnunet "
                   "--structures liver spleen aorta")
PLAN: dict[str, Run | Skip] = {
    # README: set-up and quickstart
    "python train.py": Run((), ("outputs/train/runs/{train}/checkpoints/last.ckpt",),
                           ("checkpoints:",), check=trained_once_per_line, timeout_s=3600),
    FIRST_PREDICTION: Run(files=("predictions/ct/labels.nii.gz", "predictions/ct/labels.json"),
                          check=labels_on_the_ct_grid),
    "python train.py experiment=phantom_quick":
        Run(TRAIN, ("outputs/phantom_quick/runs/*/checkpoints/last.ckpt",)),
    # docs/training.md: adding classes
    "python train.py experiment=add_class_quick "
    "model.pretrained=outputs/phantom_quick/runs/<run>/checkpoints/epoch_129.ckpt":
        Run(TRAIN, ("outputs/add_class_quick/runs/*/forgetting.json",
                    "outputs/add_class_quick/runs/*/forgetting.md")),
    # README: the dataset
    "python -m ctseg.data check /data/Totalsegmentator_dataset": Run(prints=("1 subject",)),
    "python -m ctseg.data prepare /data/Totalsegmentator_dataset --version v1 --workers 8":
        Run(files=("home/.cache/ctseg/prepared/totalseg_mini-*/v1/manifest.json",)),
    # docs/cluster.md: the full dataset on a cluster (the crop stands for the download)
    "python -m ctseg.data prepare /data/Totalsegmentator_dataset --version v1 --workers 16 "
    "--out /shared/ctseg/prepared":
        Run(files=("cluster_fs/prepared/v1/s0001.nii.gz", "cluster_fs/prepared/v1/manifest.json")),
    "torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=<host>:29400 "
    "--rdzv-id=wb2 train.py experiment=wholebody_highres trainer=ddp trainer.devices=4 "
    "trainer.num_nodes=2 data.root=/data/Totalsegmentator_dataset "
    "data.prepared_dir=/shared/ctseg/prepared data.cache_dir=/shared/ctseg/tensors "
    "trainer.ddp_timeout_min=240": Skip("needs two nodes with 4 GPUs each and the download; "
                                        "tests/test_scale_out.py runs torchrun on 2 CPU "
                                        "processes, tests/test_configs.py builds the strategy "
                                        "with trainer.ddp_timeout_min"),
    "python -m ctseg.data phantoms data/phantoms --n 12 --seed 0":
        Run(("--shape", "24", "24", "16"),
            ("data/phantoms/meta.csv", "data/phantoms/s0011/ct.nii.gz"), fresh=True),
    "python -m ctseg.data phantoms data/simulated_v2 --n 20 --size wholebody":
        Run(("--n", "2", "--scale", "0.0625"),
            ("data/simulated_v2/meta.csv", "data/simulated_v2/s0002/segmentations/brain.nii.gz")),
    # docs/dataset.md: your own datasets
    NNUNET_PHANTOMS: Run(("--shape", "24", "24", "16"), ("data/phantoms_nnunet/dataset.json",
                                                         "data/phantoms_nnunet/labelsTs/*.nii.gz")),
    "python -m ctseg.data check /data/Dataset017_BTCV":
        Run(prints=(f"{phantom_defaults().n} subject(s)", "nnU-Net raw dataset"),
            after=(NNUNET_PHANTOMS,)),
    "python -m ctseg.data prepare /data/Dataset017_BTCV":
        Run(files=("home/.cache/ctseg/prepared/phantoms_nnunet-*/mapped-*/manifest.json",),
            prints=("liver",), after=(NNUNET_PHANTOMS,)),
    # README: training
    "python train.py --help": Run(prints=("experiment:", "python train.py")),
    "python train.py --cfg job": Run(prints=("optimized_metric:",)),
    "python train.py experiment=wholebody_highres data.root=/data/Totalsegmentator_dataset":
        Skip(f"{DOWNLOAD} subject) and {GPU} (trainer=gpu)"),
    "python train.py -m data=totalseg_v1 model=segresnet data.num_folds=5 data.fold=0,1,2,3,4 "
    "callbacks=cross_validation": Skip(f"{DOWNLOAD} subject); {CV_ON_PHANTOMS}"),
    "python -m ctseg.evaluate cv=outputs/train/multiruns/<cv>":
        Skip(f"needs the cross-validation of the download; {CV_ON_PHANTOMS}"),
    "python -m ctseg.compare outputs/train/multiruns/<cv> outputs/train/multiruns/<other_cv>":
        Skip(f"needs two cross-validations of the download; {CV_ON_PHANTOMS}"),
    "python predict.py ckpt=outputs/train/multiruns/<cv> input=ct.nii.gz output=predictions "
    "tta=mirror": Skip("needs the cross-validation of the download; the ensemble of a phantom "
                       "sweep and TTA run above"),
    "python train.py data=totalseg_v2 data.root=/data/TotalsegmentatorV2 trainer=gpu":
        Skip(f"needs the TotalSegmentator v2 download and {GPU}"),
    "python train.py experiment=wholebody_highres "
    "model.pretrained=/bundles/wholeBody_ct_segmentation/models/model.pt":
        Skip(f"needs the bundle's weights, {DOWNLOAD} subject) and {GPU}"),
    "python train.py data=totalseg_v2 model.pretrained=.../model.pt model.reinit_head=true":
        Skip("needs the bundle's weights and the TotalSegmentator v2 download"),
    "python train.py ckpt_path=outputs/train/runs/2026-11-26_10-00-00":
        Run(RESUME, check=default_run_resumed_in_place(101)),
    PHANTOM_RESUME: Run(("trainer.max_epochs=2",), check=phantom_quick_resumed_in_place),
    "python train.py ckpt_path=/path/to/epoch_010.ckpt":
        Run(RESUME, check=default_run_resumed_in_place(101)),
    "python train.py ckpt_path=last hydra.run.dir=outputs/train/runs/2026-11-26_10-00-00":
        Run(RESUME, check=default_run_resumed_in_place(101)),
    "python train.py callbacks.overlays=null": Run(TRAIN),
    # train.py --help
    "python train.py -m model.optimizer.lr=1e-3,3e-4 seed=1,2":
        Run(TRAIN, ("outputs/train/multiruns/*/3/checkpoints/last.ckpt",)),
    "python train.py ckpt_path=outputs/train/runs/<run>":
        Run(RESUME_AGAIN, check=default_run_resumed_in_place(102)),
    "python train.py callbacks.overlays.max_cases=4 callbacks.overlays.every_n_validations=5":
        Run(TRAIN),
    # README: logging, sweeps and search
    "python -m ctseg.compare outputs/phantom_quick/multiruns/<name>":
        Run(files=("outputs/phantom_quick/multiruns/{sweep}/comparison/compare.csv",)),
    "python -m ctseg.compare outputs/train/runs/<a> outputs/train/runs/<b> --out comparison":
        Run(files=("comparison/compare.csv", "comparison/val_curves.png")),
    SEARCH_COMMAND:
        Run(SEARCH, ("outputs/phantom_quick/optuna/phantom_quick/study.db",
                     "outputs/phantom_quick/optuna/phantom_quick/trial_1/checkpoints/last.ckpt"),
            check=two_finished_trials),
    "python -m ctseg.hparams_search hparams_search=optuna hparams_search.n_trials=50 "
    "hparams_search.storage=postgresql://user:pass@db/optuna hparams_search.params.lr.high=0.1":
        Skip("needs a PostgreSQL server; the same search on the default SQLite storage runs"),
    "python -m ctseg.compare outputs/phantom_quick/optuna/phantom_quick":
        Run(files=("outputs/phantom_quick/optuna/phantom_quick/comparison/compare.csv",),
            after=(SEARCH_COMMAND,)),
    # README: on a cluster
    "python train.py -m experiment=phantom_quick model.optimizer.lr=1e-3,3e-3 seed=1,2":
        Run(TRAIN, ("outputs/phantom_quick/multiruns/{sweep}/3/checkpoints/last.ckpt",),
            check=one_job_per_combination),
    "python train.py -m experiment=phantom_quick trainer=ddp trainer.accelerator=cpu "
    "trainer.devices=2 precision=fp32 seed=1,2":
        Run(TRAIN, ("outputs/phantom_quick/multiruns/*/1/checkpoints/last.ckpt",)),
    "python train.py experiment=wholebody_highres trainer=ddp trainer.devices=4":
        Skip(f"{DOWNLOAD} subject) and 4 GPUs; the DDP sweep on 2 CPU processes runs"),
    "python train.py -m experiment=wholebody_highres trainer=ddp trainer.devices=4 seed=1,2":
        Skip(f"{DOWNLOAD} subject) and 4 GPUs; the DDP sweep on 2 CPU processes runs"),
    "torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=<host>:29400 "
    "--rdzv-id=wb1 train.py experiment=wholebody_highres trainer=ddp trainer.devices=4 "
    "trainer.num_nodes=2": Skip("needs two nodes with 4 GPUs each and the download; "
                                "tests/test_scale_out.py runs torchrun on 2 CPU processes"),
    "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu "
    "hydra.launcher.timeout_min=720 experiment=wholebody_highres trainer=ddp trainer.devices=4 "
    "trainer.num_nodes=2 seed=1,2": Skip("needs a SLURM cluster; the same submitit launcher "
                                         "runs locally with hydra/launcher=local_submitit"),
    "python train.py -m hydra/launcher=local_submitit experiment=phantom_quick seed=1,2":
        Run(TRAIN, ("outputs/phantom_quick/multiruns/*/1/checkpoints/last.ckpt",)),
    # README: VISTA3D
    "python train.py experiment=vista3d_quick":
        Run(TRAIN, ("outputs/vista3d_quick/runs/{vista}/checkpoints/last.ckpt",)),
    "python train.py experiment=vista3d_totalseg data.root=/data/TotalsegmentatorV2 "
    "model.pretrained=/bundles/vista3d/models/model.pt":
        Skip("needs the vista3d bundle's weights, the TotalSegmentator v2 download and a GPU"),
    "python predict.py ckpt=run/checkpoints/last.ckpt input=ct.nii.gz output=pred":
        Run(files=("pred/ct/labels.nii.gz",)),
    "python predict.py ckpt=... input=... output=... 'prompt.labels=[1,3]'":
        Run(files=("pred/ct/labels.nii.gz",)),
    "python predict.py ckpt=... input=... output=... 'prompt.labels=[2]'":
        Run(files=("pred/ct/labels.nii.gz",)),
    "python predict.py ckpt=... input=... output=... 'prompt.points=[[91,51,20]]' "
    "'prompt.point_labels=[1]'": Run(files=("pred/ct/labels.nii.gz",)),
    "python predict.py ckpt=... input=... output=... 'prompt.points=[[91,51,20],[70,40,20]]' "
    "'prompt.point_labels=[1,0]' 'prompt.labels=[1]'": Run(files=("pred/ct/labels.nii.gz",)),
    "python predict.py ckpt=... input=... output=... 'prompt.labels=[140]' "
    "'prompt.points=[[60,70,12]]' 'prompt.point_labels=[1]'": Run(files=("pred/ct/labels.nii.gz",)),
    # docs/vista3d.md: interactive evaluation
    "python -m ctseg.evaluate.interactive ckpt=run/checkpoints/last.ckpt gt=data/phantoms "
    "split=test": Run(files=("interactive_evaluation/summary.json",
                             "interactive_evaluation/clicks/*.json"), prints=("| overall |",)),
    CLICKS_ALONE: Run(files=("clicks_alone/clicks.csv", "clicks_alone/clicks/s0001.json")),
    CLICKS_WITH_ID: Run(files=("clicks_with_id/clicks.csv",), after=(CLICKS_ALONE,),
                        check=clicks_replayed),
    "python -m ctseg.compare clicks_alone clicks_with_id --out clicks_compared":
        Run(files=("clicks_compared/clicks_compare.md", "clicks_compared/dice_vs_clicks.png"),
            after=(CLICKS_WITH_ID,), prints=("2 interactive evaluations",)),
    "python -m ctseg.evaluate.interactive --help": Run(prints=("clicks_from", "Dice after each")),
    # README: prediction
    "python predict.py ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt "
    "input=../shared/data/totalseg_mini/s0001/ct.nii.gz output=predictions":
        Run(files=("predictions/ct/labels.nii.gz",)),
    "python predict.py ckpt=model.pt input=/data/ct_folder output=predictions device=cuda "
    "probabilities=[liver,spleen] overwrite=true":
        Skip(f"needs the wholeBody_ct_segmentation bundle's weights and {GPU}"),
    "python predict.py ckpt=last.ckpt input=/data/dicom/study output=predictions "
    "series_uid=1.2.840...": Run(files=("predictions/dicom_study/labels.nii.gz",)),
    "python predict.py --help": Run(prints=("ckpt",)),
    "python predict.py ckpt=outputs/phantom_quick/multiruns/<name> input=ct.nii.gz "
    "output=predictions": Run(files=("predictions/ct/labels.nii.gz",),
                              prints=("ensemble of 4 models",)),
    "python predict.py ckpt=last.ckpt input=ct.nii.gz output=predictions_tta tta=mirror":
        Run(files=("predictions_tta/ct/labels.nii.gz",), prints=("x 8 mirroring(s)",)),
    "python predict.py ckpt=last.ckpt input=/data/dicom/study output=predictions dicom_seg=true":
        Run(files=("predictions/dicom_study/seg.dcm",), check=seg_reads_back),
    # README: evaluation and overlays
    DATASET_PREDICTION: Run(files=("predictions/s0001/labels.nii.gz",)),
    "python -m ctseg.evaluate pred=predictions gt=/data/Totalsegmentator_dataset version=v1 "
    "split=test": Run(files=("predictions/evaluation/scores.csv",), after=(DATASET_PREDICTION,)),
    "python -m ctseg.evaluate pred=predictions gt=<folder of <case>.nii.gz label maps> "
    "tolerance_mm=2": Run(files=("predictions/evaluation/scores.csv",),
                          after=(DATASET_PREDICTION,)),
    "python -m ctseg.visualize ct=scan.nii.gz labels=predictions/scan/labels.nii.gz "
    "out=scan_overlay.png": Run(files=("scan_overlay.png",), after=(DATASET_PREDICTION,)),
    "python -m ctseg.visualize ct=s0001/ct.nii.gz labels=s0001/label_totalseg_v2.nii.gz "
    "version=v2 out=s0001.png window=lung alpha=1": Run(files=("s0001.png",)),
    "python -m ctseg.visualize --help": Run(prints=("ct=",)),
    # README: export
    EXPORT:
        Run(files=("export/export.json", "export/model.ts", "export/model.onnx")),
    "python -m ctseg.export ckpt=model.pt formats=[onnx,trt_fp16] output=export "
    "sample=ct.nii.gz": Skip(f"needs the bundle's weights and {GPU} (TensorRT)"),
    "python train.py experiment=phantom_quick callbacks=export":
        Run(TRAIN, ("outputs/phantom_quick/runs/*/export/export.json",)),
    "python predict.py ckpt=export input=ct.nii.gz output=predictions":
        Run(files=("predictions/ct/labels.nii.gz",), after=(EXPORT,)),
    "python predict.py ckpt=last.ckpt backend=onnxruntime input=ct.nii.gz output=predictions":
        Run(files=("predictions/ct/labels.nii.gz",)),
    "python -m ctseg.export --help": Run(prints=("formats",)),
    # python -m ctseg.export --help, python -m ctseg.visualize --help
    "python predict.py ckpt=export backend=onnxruntime input=ct.nii.gz output=pred":
        Run(files=("pred/ct/labels.nii.gz",), after=(EXPORT,)),
    "python -m ctseg.visualize ct=ct.nii.gz labels=label_totalseg_v2.nii.gz version=v2 out=o.png "
    "window=[1500,-600] alpha=1": Run(files=("o.png",)),
}
# Which command gives each `{name}` field of PLACEHOLDERS and of the expected files.
SOURCES = {
    "train": "python train.py",
    "train_b": "python train.py callbacks.overlays=null",
    "vista": "python train.py experiment=vista3d_quick",
    "phantom": "python train.py experiment=phantom_quick",
    "sweep": "python train.py -m experiment=phantom_quick model.optimizer.lr=1e-3,3e-3 seed=1,2",
}


# The planned commands fall into chains that read no output of another chain: the default run's,
# the phantom recipes', VISTA3D's and the quick ones. Each chain is a pytest-xdist group of its
# own (tests/conftest.py), so the chains run side by side, each in its own workspace.
CHAIN_OF_FIELD = {"train": "default_run", "best": "default_run", "train_b": "default_run",
                  "phantom": "phantom_recipes", "sweep": "phantom_recipes", "vista": "vista3d"}
TRAINS = re.compile(r"^python (train\.py|-m ctseg\.hparams_search) (?!--)")


def as_typed(command: str) -> str:
    """A planned command with its documented placeholders replaced (PLACEHOLDERS, in order)."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return command


def fields_read(command: str) -> set[str]:
    """The `{name}` fields a planned command gives (SOURCES) or fills in (its placeholders and
    expected files)."""
    typed = as_typed(command)
    files = PLAN[command].files if isinstance(PLAN[command], Run) else ()
    gives = {name for name, source in SOURCES.items() if source == command}
    return gives.union(re.findall(r"\{(\w+)\}", " ".join((typed, *files))))


def chain(command: str) -> str:
    """The chain of a planned command: that of the runs it reads or of the commands it runs
    after, else `phantom_recipes` for a command that trains, else `quick`."""
    after = PLAN[command].after if isinstance(PLAN[command], Run) else ()
    chains = {CHAIN_OF_FIELD[name] for name in fields_read(command) if name in CHAIN_OF_FIELD}
    chains |= {chain(earlier) for earlier in after} - {"quick"}
    assert len(chains) <= 1, f"{command} reads the outputs of the chains {chains}"
    return chains.pop() if chains else "phantom_recipes" if TRAINS.match(command) else "quick"


def commands_in(text: str) -> list[str]:
    """The ctseg commands of the fenced code blocks (or help text) `text`: continuation lines
    joined, `# comments` and repeated spaces removed, `a && b` split."""
    blocks = re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, re.S | re.M) or [text]
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split(" && "):
                part = re.sub(r"\s+#.*$", "", part.strip())
                if PROGRAMS.match(part):
                    commands.append(re.sub(r"\s+", " ", part))
    return commands


def documented_commands() -> list[str]:
    """Commands of README.md and of every page under docs/, in order, without repeats."""
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return list(dict.fromkeys(c for f in files if f.is_file() for c in commands_in(f.read_text())))


@dataclass
class Workspace:
    """A user's clone in a temporary folder and the commands run in it so far."""

    tmp: Path
    clone: Path
    env: dict[str, str]
    server: CommandServer
    results: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    makers: dict[str, Callable[[Workspace], str]] = field(default_factory=dict)

    def value(self, name: str) -> str:
        """The value of a `{name}` field, running the command that gives it first."""
        if name not in self.values:
            if name in SOURCES:
                self.run(SOURCES[name])
            else:
                self.values[name] = self.makers[name](self)
        return self.values[name]

    def fill(self, text: str) -> str:
        """`text` with its `{name}` fields filled in."""
        return re.sub(r"\{(\w+)\}", lambda m: self.value(m.group(1)), text)

    def run(self, command: str) -> subprocess.CompletedProcess:
        """Run a planned command once (later calls return the first result)."""
        if command in self.results:
            return self.results[command]
        plan = PLAN[command] if command in PLAN else Run()
        assert isinstance(plan, Run), command
        for earlier in plan.after:
            self.run(earlier)
        typed = as_typed(command)
        cwd = self.clone
        if plan.fresh:
            cwd = copy_clone(self.tmp / f"fresh{len(self.results)}" / "ctseg")
        before = runs_under(self.clone)
        words = shlex.split(self.fill(typed))
        predicts = words[:2] == ["python", "predict.py"] and "--help" not in words
        if predicts:
            # Earlier predictions into the same folder would make this command skip its case.
            output = cwd / next(w for w in words if w.startswith("output="))[len("output="):]
            if output.exists():
                output.rename(output.with_name(f"{output.name}.before{len(self.results)}"))
        if words[0] == "python":
            result = self.server.run([*words[1:], *plan.shrink], cwd, timeout=plan.timeout_s)
        else:
            result = subprocess.run([*words, *plan.shrink], cwd=cwd, env=self.env,
                                    capture_output=True, text=True, timeout=plan.timeout_s)
        self.results[command] = result
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{typed}\n{output[-4000:]}"
        assert "Traceback" not in output, f"{typed}\n{output[-4000:]}"
        if predicts:
            assert re.search(r"\b[1-9]\d* predicted, 0 skipped, 0 failed", output), output[-3000:]
        for name, source in SOURCES.items():
            if source == command:
                new = sorted(set(runs_under(self.clone)) - set(before))
                assert new, f"{command} made no run folder"
                self.values[name] = new[0].name
        return result


def runs_under(clone: Path) -> list[Path]:
    """Run and sweep folders under the clone's outputs/ (outputs/<task>/{runs,multiruns}/<n>)."""
    return sorted(clone.glob("outputs/*/runs/*")) + sorted(clone.glob("outputs/*/multiruns/*"))


def copy_clone(dest: Path) -> Path:
    """Copy the files git tracks (and untracked files it does not ignore) to `dest`, with the
    shared data beside it as `../shared`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source, target = REPO / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    shared = dest.parent / "shared"
    if not shared.exists():
        shared.symlink_to(SHARED_DATA.parent, target_is_directory=True)
    return dest


def best_checkpoint(ws: Workspace) -> str:
    """The file name of the default run's best checkpoint (`epoch_NNN.ckpt`)."""
    found = sorted((ws.clone / "outputs/train/runs" / ws.value("train") / "checkpoints")
                   .glob("epoch_*.ckpt"))
    assert len(found) == 1, found
    return found[0].name


def dicom_study(ws: Workspace) -> str:
    """Write the shared CT as a DICOM series to `<clone>/dicom_study`; its SeriesInstanceUID."""
    return write_dicom_series(nib.load(SHARED_DATA / "totalseg_mini/s0001/ct.nii.gz"),
                              ws.clone / "dicom_study")


def label_maps(ws: Workspace) -> str:
    """A folder of `<case>.nii.gz` label maps: the crop's merged label map as `s0001.nii.gz`."""
    ws.run("python -m ctseg.data prepare /data/Totalsegmentator_dataset --version v1 --workers 8")
    merged = next((ws.tmp / "home").glob(".cache/ctseg/prepared/totalseg_mini-*/v1/s0001*"))
    folder = ws.clone / "label_maps"
    folder.mkdir(exist_ok=True)
    shutil.copy(merged if merged.is_file() else next(merged.glob("*.nii.gz")),
                folder / "s0001.nii.gz")
    return "label_maps"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A fresh user's clone, environment and home folder."""
    tmp = tmp_path_factory.mktemp("user")
    clone = copy_clone(tmp / "ctseg")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CTSEG_", "WANDB_", "PYTEST_", "HYDRA_"))}
    (tmp / "home").mkdir()
    env["HOME"] = str(tmp / "home")
    makers = {"series_uid": dicom_study, "label_maps": label_maps, "best": best_checkpoint}
    server = CommandServer(clone, env, tmp / "command_server.log")
    yield Workspace(tmp, clone, env, server, makers=makers)
    server.close()


@pytest.fixture(scope="module")
def help_texts(workspace: Workspace) -> dict[str, str]:
    """The output of every CLI's --help."""
    return {c: workspace.run(c).stdout for c in HELP}


def test_every_documented_command_is_planned(help_texts: dict[str, str]):
    documented = documented_commands()
    for text in help_texts.values():
        documented += [c for c in commands_in(text) if c not in documented]
    assert len(documented) > 40
    unplanned = [c for c in documented if c not in PLAN and c not in HELP]
    assert not unplanned, "plan these commands in tests/test_commands_as_typed.py:\n" + \
        "\n".join(unplanned)
    stale = [c for c in PLAN if c not in documented]
    assert not stale, "no longer documented; remove from PLAN:\n" + "\n".join(stale)


def test_commands_are_read_from_fenced_blocks_with_continuations_and_comments():
    text = ("prose `python train.py x=1`\n```bash\npip install -e . && python train.py\n"
            "python predict.py a=1 \\\n    b=2   # a comment\nls\n```\n")
    assert commands_in(text) == ["python train.py", "python predict.py a=1 b=2"]


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.xdist_group(f"commands_as_typed:{chain(c)}")) for c in PLAN])
def test_documented_command_runs_as_typed(command: str, workspace: Workspace):
    plan = PLAN[command]
    if isinstance(plan, Skip):
        pytest.skip(plan.reason)
    if plan.gpu and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    output = workspace.run(command)
    text = output.stdout + output.stderr
    for expected in plan.prints:
        assert expected in text, f"{command}: {expected!r} not in its output\n{text[-3000:]}"
    for pattern in plan.files:
        pattern = workspace.fill(pattern)
        root = workspace.tmp if pattern.startswith("home/") else workspace.clone
        if plan.fresh:
            root = workspace.tmp
            pattern = f"fresh*/ctseg/{pattern}"
        assert list(root.glob(pattern)), f"{command}: no {pattern} under {root}"
    if plan.check is not None:
        plan.check(workspace)
