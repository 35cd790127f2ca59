"""Resuming a run from its folder, as a user types it: `python train.py experiment=phantom_quick`
(shrunk), then `python train.py ckpt_path=<run folder> trainer.max_epochs=2` continues that run in
its folder with its own settings, the changed one logged; a resume refused for a bad value leaves
the run's recorded overrides as they were. `ctseg.resume` in-process for the command lines that
resume nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, column, metric_rows
from omegaconf import OmegaConf

from ctseg.resume import OVERRIDES, resume_arguments

# experiment=phantom_quick shrunk to one 16^3 patch batch per epoch on 4 small phantoms.
TINY = (
    "experiment=phantom_quick", "model.init_filters=8", "data.n_phantoms=4",
    "data.phantom_shape=[24,24,16]", "data.patch_size=[16,16,16]", "data.batch_size=2",
    "data.samples_per_volume=1", "model.sw_batch_size=2", "trainer.check_val_every_n_epoch=1",
    "callbacks.progress_bar=null", "callbacks.model_summary=null", "test=false",
)


def train(*args: str) -> subprocess.CompletedProcess:
    """`python train.py <args>` from the clone, as typed."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_a_run_resumed_from_its_folder_continues_there_with_its_own_settings(tmp_path: Path):
    outputs = tmp_path / "outputs"
    first = train(*TINY, "trainer.max_epochs=1", f"paths.log_dir={outputs}",
                  f"paths.data_dir={tmp_path / 'data'}")
    assert first.returncode == 0, first.stderr[-3000:]
    [run] = outputs.glob("*/runs/*")
    assert run.parent.parent.name == "phantom_quick"
    steps = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert steps > 0

    resumed = train(f"ckpt_path={run}", "trainer.max_epochs=2")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert list(outputs.glob("*/runs/*")) == [run]  # no run folder of its own
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 2 * steps)
    assert [epoch for epoch, _ in column(metric_rows(run, version=1), "train/loss_epoch")] == [1]
    config = OmegaConf.load(run / "checkpoints/config.yaml")
    assert config.task_name == "phantom_quick"
    assert config.data.extra_roots == [] and config.data.n_phantoms == 4
    assert (config.trainer.max_epochs, config.trainer.check_val_every_n_epoch) == (2, 1)
    assert config.model.init_filters == 8 and config.paths.output_dir == str(run)
    changes = [line for line in output.splitlines() if "resume changes" in line]
    assert len(changes) == 1, output[-3000:]
    assert changes[0].endswith("resume changes trainer.max_epochs=2 (the run had "
                               "trainer.max_epochs=1)")

    recorded = (run / OVERRIDES).read_text()
    refused = train(f"ckpt_path={run}/checkpoints/last.ckpt", "data.spacing=abc")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-3000:]
    assert "data.spacing='abc'" in errors[0]
    assert (run / OVERRIDES).read_text() == recorded


@pytest.mark.parametrize("args", [
    ["ckpt_path=last"],  # the new run's own folder
    ["-m", "ckpt_path={run}", "seed=1,2"],  # each job gets ckpt_path as given
    ["ckpt_path={ckpt}"],  # a checkpoint outside any run folder
    ["ckpt_path={run}/epoch_001.ckpt"],  # not in the run's checkpoints/
])
def test_a_command_resuming_no_run_folder_keeps_its_arguments(tmp_path: Path, args: list[str]):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / OVERRIDES).write_text("- experiment=phantom_quick\n")
    (tmp_path / "model.ckpt").write_bytes(b"")
    typed = [a.format(run=run, ckpt=tmp_path / "model.ckpt") for a in args]
    resume = resume_arguments(typed)
    assert (resume.arguments, resume.folder, resume.notes) == (typed, None, [])


def test_the_settings_a_resume_logs_leave_out_an_earlier_resumes_checkpoint(tmp_path: Path):
    """A run resumed once records that resume's ckpt_path and run folder among its overrides;
    resuming it again logs the run's settings without them."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / OVERRIDES).write_text(f"- experiment=phantom_quick\n- ckpt_path={run}/checkpoints/"
                                 f"last.ckpt\n- trainer.max_epochs=2\n- hydra.run.dir={run}\n")
    resume = resume_arguments([f"ckpt_path={run}", "trainer.max_epochs=3"])
    assert resume.notes[0] == (f"resuming {run} with the overrides it was started with: "
                               "experiment=phantom_quick trainer.max_epochs=2")


def test_the_resume_command_wins_over_the_runs_overrides_key_by_key(tmp_path: Path):
    run = tmp_path / "my run"
    (run / ".hydra").mkdir(parents=True)
    (run / OVERRIDES).write_text("- experiment=phantom_quick\n- trainer.max_epochs=1\n"
                                 "- +logger.csv.flush_logs_every_n_steps=1\n- seed=3\n")
    resume = resume_arguments(["--cfg", "job", f"ckpt_path={run}/checkpoints/last.ckpt",
                               "trainer.max_epochs=2", "logger.csv.flush_logs_every_n_steps=5",
                               "seed=3", "callbacks.overlays=null"])
    assert resume.folder == run
    assert resume.arguments == [
        "--cfg", "job", "experiment=phantom_quick", f"ckpt_path={run}/checkpoints/last.ckpt",
        "trainer.max_epochs=2",
        "++logger.csv.flush_logs_every_n_steps=5", "seed=3", "callbacks.overlays=null",
        f"hydra.run.dir='{run}'"]
    assert resume.notes[1:] == [
        "resume changes trainer.max_epochs=2 (the run had trainer.max_epochs=1)",
        "resume changes logger.csv.flush_logs_every_n_steps=5 (the run had "
        "+logger.csv.flush_logs_every_n_steps=1)",
        "resume adds callbacks.overlays=null (not set when the run started)"]
