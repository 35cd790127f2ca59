"""Errors across processes and the checks a run makes before its first step."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import truncate

from ctseg.data.datamodule import SegmentationDataModule
from ctseg.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    MissingFileError,
    user_message,
)
from ctseg.training import train

REPO = Path(__file__).resolve().parents[1]
# A real TotalSegmentator root at a coarse grid with a slim model: seconds per run.
SMALL = ("data=totalseg_v1", "data.spacing=6.0", "data.patch_size=[16,16,16]",
         "model.init_filters=8", "model.sw_batch_size=2", "trainer.max_epochs=1",
         "trainer.check_val_every_n_epoch=1", "callbacks.progress_bar=null",
         "callbacks.model_summary=null")


def _raise_dataset_error(rank: int, path: str) -> None:
    """A spawned process failing on a bad file."""
    raise DatasetError(path, f"bad file seen by rank {rank}")


def test_dataset_error_survives_pickling_and_worker_reraise() -> None:
    err = DatasetError("/data/s0001/ct.nii.gz", "corrupt or truncated NIfTI file")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.path, again.problem) == (
        DatasetError, str(err), err.path, err.problem)
    # torch's DataLoader re-raises a worker's error as type(err)(<its traceback text>).
    text = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
            "call last):\n  File \"x.py\", line 1, in f\nctseg.errors.DatasetError: "
            "/data/s0001/ct.nii.gz: corrupt or truncated NIfTI file\n")
    rebuilt = DatasetError(text)
    assert str(rebuilt) == str(err) and rebuilt.path == err.path


def test_user_message_finds_the_error_of_a_spawned_process(tmp_path: Path) -> None:
    bad = str(tmp_path / "s0001" / "ct.nii.gz")
    with pytest.raises(Exception) as info:
        mp.spawn(_raise_dataset_error, args=(bad,), nprocs=2, join=True)
    assert not isinstance(info.value, DatasetError)
    message = user_message(info.value)
    assert message is not None and message.startswith(f"{bad}: bad file seen by rank ")
    assert user_message(RuntimeError("unrelated")) is None


def test_dataloader_workers_name_the_bad_file(two_subjects: Path, tmp_path: Path) -> None:
    # Default worker count and cache; the CT breaks after the run was prepared.
    dm = SegmentationDataModule(root=str(two_subjects), spacing=6.0, patch_size=16,
                                    prepared_dir=str(tmp_path / "prepared"),
                                    cache_dir=str(tmp_path / "tensors"))
    assert dm.hparams.num_workers > 0 and dm.hparams.prepare_workers > 1
    dm.prepare_data()
    dm.setup("fit")
    truncate(two_subjects / "s0001" / "ct.nii.gz")
    with pytest.raises(DatasetError) as info:
        next(iter(dm.train_dataloader()))
    assert info.value.path == two_subjects / "s0001" / "ct.nii.gz"
    assert "cannot load or preprocess this subject" in info.value.problem
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_train_cli_reports_a_truncated_ct_in_one_line(two_subjects: Path, tmp_path: Path,
                                                      trainer: str) -> None:
    truncate(two_subjects / "s0002" / "ct.nii.gz")
    run = tmp_path / "run"
    command = [sys.executable, "train.py", *SMALL, f"trainer={trainer}",
               f"data.root={two_subjects}", f"hydra.run.dir={run}",
               f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CTSEG_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"error: {two_subjects}/s0002/ct.nii.gz: corrupt or truncated")
    assert "Traceback" not in result.stderr
    assert not list(run.rglob("*.ckpt"))


def test_train_cli_sends_a_search_to_its_own_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [sys.executable, "train.py", "hparams_search=optuna", f"hydra.run.dir={run}",
               f"paths.log_dir={tmp_path / 'outputs'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: hparams_search: train.py trains one run; run the search with "
                      "python -m ctseg.hparams_search hparams_search=<space> [overrides]"]
    assert "Traceback" not in result.stderr
    assert not list(run.rglob("*.ckpt"))


def test_missing_test_split_skips_the_test_stage(two_subjects, compose_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ctseg.training"):
        metrics, objects = train(compose_cfg(*SMALL, f"data.root={two_subjects}"))
    assert objects["trainer"].global_step == 1
    assert "val/mean_dice" in metrics
    assert not any(key.startswith("test/") for key in metrics)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ctseg.training"]
    assert len(warnings) == 1
    assert warnings[0] == (f"{two_subjects}/meta.csv: no 'test' subject, so the test stage is "
                           "skipped (test=false silences this)")


def test_missing_train_split_fails_before_any_step(two_subjects, compose_cfg, tmp_path):
    (two_subjects / "meta.csv").write_text("image_id;split\ns0001;val\ns0002;test\n")
    with pytest.raises(ConfigError, match=r"meta\.csv: no 'train' subject"):
        train(compose_cfg(*SMALL, f"data.root={two_subjects}"))
    assert not (tmp_path / "run" / "csv").exists()


def test_unwritable_output_folder_fails_before_any_step(two_subjects, compose_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = compose_cfg(*SMALL, f"data.root={two_subjects}")
    cfg.callbacks.model_checkpoint.dirpath = str(blocker / "checkpoints")
    with pytest.raises(ConfigError, match=r"file/checkpoints: cannot write the checkpoints"):
        train(cfg)


def test_class_count_mismatch_fails_before_any_step(two_subjects, compose_cfg):
    cfg = compose_cfg(*SMALL, f"data.root={two_subjects}", "model.num_classes=118",
                      "model.label_names=null")
    with pytest.raises(ConfigError, match="the model has 118 output classes but the data has 105"):
        train(cfg)


def test_resume_refuses_a_checkpoint_with_pickled_objects(two_subjects, compose_cfg, tmp_path):
    train(compose_cfg(*SMALL, f"data.root={two_subjects}"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 1
    checkpoint["hyper_parameters"]["loss"] = torch.nn.CrossEntropyLoss()
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(checkpoint, unsafe)
    message = rf"{unsafe}: refusing to load the checkpoint to resume: .*CrossEntropyLoss"
    with pytest.raises(CheckpointError, match=message):
        train(compose_cfg(*SMALL, f"data.root={two_subjects}", "trainer.max_epochs=2",
                          f"ckpt_path={unsafe}"))
    with pytest.raises(MissingFileError, match="no checkpoint at"):
        train(compose_cfg(*SMALL, f"data.root={two_subjects}", f"ckpt_path={tmp_path / 'no'}"))
