"""A cross-validation end to end on phantoms: two folds trained with callbacks=cross_validation
keep their out-of-fold predictions and scores, `python -m ctseg.evaluate cv=` pools them (each
pool subject once), and compare treats the folds as one config."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO
from omegaconf import open_dict

from ctseg.compare import compare
from ctseg.data.folds import read_splits
from ctseg.training import train

pytestmark = pytest.mark.slow
TINY = ("experiment=phantom_quick", "model.init_filters=8", "data.n_phantoms=8",
        "data.phantom_shape=[24,24,16]", "data.patch_size=[16,16,16]", "data.extra_roots=[]",
        "model.sw_batch_size=2", "callbacks=cross_validation", "callbacks.progress_bar=null",
        "callbacks.overlays=null", "callbacks.model_summary=null", "logger=csv",
        "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1", "data.num_folds=2")


def test_folds_pool_their_out_of_fold_scores(compose_cfg, tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    for fold in (0, 1):
        cfg = compose_cfg(*TINY, f"data.fold={fold}", f"seed={fold}")
        with open_dict(cfg):
            cfg.paths.output_dir = str(cv / str(fold))
        (cv / str(fold) / ".hydra").mkdir(parents=True)
        (cv / str(fold) / ".hydra" / "overrides.yaml").write_text(
            f"- data.fold={fold}\n- seed={fold}\n")
        train(cfg)
    folds = read_splits(cv / "0" / "checkpoints" / "splits_final.json")
    for fold in (0, 1):
        kept = sorted(p.name for p in (cv / str(fold) / "evaluation/val/predictions").glob(
            "*.nii.gz"))
        assert kept == [f"{case}.nii.gz" for case in folds[fold]["val"]]
        assert nib.load(cv / str(fold) / "evaluation/val/predictions" / kept[0]).shape
        assert (cv / str(fold) / "evaluation/scores.csv").is_file()  # the test split too
    done = subprocess.run([sys.executable, "-m", "ctseg.evaluate", f"cv={cv}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with (cv / "cv_evaluation" / "scores.csv").open() as f:
        cases = {r["case"] for r in csv.DictReader(f)}
    assert cases == set(folds[0]["val"]) | set(folds[1]["val"])  # the whole pool, out of fold
    assert "cv_evaluation" in done.stdout
    # post-processing chosen on the out-of-fold predictions, beside every fold's checkpoints
    choice = json.loads((cv / "cv_evaluation" / "postprocessing.json").read_text())
    assert set(choice) == {"largest_component", "out_of_fold_dice"} and choice["out_of_fold_dice"]
    for fold in (0, 1):
        assert json.loads((cv / str(fold) / "checkpoints" / "postprocessing.json").read_text()
                          ) == choice
    case = folds[0]["val"][0]
    done = subprocess.run([sys.executable, "predict.py", f"ckpt={cv}", f"output={tmp_path / 'p'}",
                           f"input={next((tmp_path / 'data').rglob(f'{case}/ct.nii.gz'))}",
                           "masks=false", "progress=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ensemble of 2 models" in done.stdout and "post-processing from" in done.stdout
    compare([cv], tmp_path / "compare")
    with (tmp_path / "compare" / "statistics.csv").open() as f:
        overall = [r for r in csv.DictReader(f) if r["structure"] == "overall"]
    assert len(overall) == 1 and overall[0]["runs"] == "2"  # folds: one config
    # over the out-of-fold cases that cv_evaluation scored, not the folds' shared test cases
    with (cv / "cv_evaluation" / "scores.csv").open() as f:
        pooled = [r for r in csv.DictReader(f) if r["dice"] not in ("", "nan")]
    per_case = [np.mean([float(r["dice"]) for r in pooled if r["case"] == c]) for c in cases]
    assert overall[0]["dice_n"] == str(len(cases)) and overall[0]["scores"] == "out-of-fold"
    assert float(overall[0]["dice_mean"]) == pytest.approx(np.mean(per_case))
    text = (tmp_path / "compare" / "compare.md").read_text()
    assert "Statistics over out-of-fold cases" in text
    assert f"warning: fewer than 10 cases ((defaults): {len(cases)} cases)" in text
