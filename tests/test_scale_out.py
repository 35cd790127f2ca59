"""Scale-out with real processes: run folders of simultaneous jobs, DDP under Hydra (subprocess
launcher, gloo) in a single run and in a multirun, evaluation without double counting."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pytest
import torch
from helpers import wandb_run
from hydra.utils import instantiate
from lightning import Trainer
from omegaconf import OmegaConf

from ctseg.compare import main as compare_main
from ctseg.data.phantoms import write_phantoms
from ctseg.data.sampling import shard

REPO = Path(__file__).resolve().parents[1]
# Tiny phantoms: 17 give 11 train, 3 val, 3 test subjects (3 val on 2 ranks: one rank has 2).
TINY = (
    "experiment=phantom_quick", "model.init_filters=8", "data.n_phantoms=17",
    "data.phantom_shape=[24,24,16]", "data.patch_size=[16,16,16]", "data.batch_size=2",
    "data.extra_roots=[]", "model.sw_batch_size=2", "trainer.check_val_every_n_epoch=1",
    "callbacks.progress_bar=null", "callbacks.model_summary=null", "test=false", "logger=csv",
)
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32")

pytestmark = pytest.mark.slow


def train_py(*overrides: str, tmp: Path) -> subprocess.Popen:
    """Start `python train.py` with `overrides`, outputs and data under `tmp`."""
    command = [sys.executable, "train.py", *overrides, f"paths.log_dir={tmp / 'outputs'}",
               f"paths.data_dir={tmp / 'data'}"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    """Wait for `process`; its output, asserting it succeeded."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def val_dice(run: Path) -> list[float]:
    """Logged val/mean_dice values of a run folder, in order."""
    with (run / "csv" / "version_0" / "metrics.csv").open() as f:
        return [float(r["val/mean_dice"]) for r in csv.DictReader(f) if r.get("val/mean_dice")]


def test_evaluation_shards_do_not_repeat_subjects():
    shards = [shard(list(range(5)), rank, 2, pad=False) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3, 4]
    assert sorted(len(s) for s in shards) == [2, 3]
    assert [shard([7], rank, 2, pad=False) for rank in range(2)] == [[7], [7]]


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    jobs = [train_py(*TINY, "debug=fast_dev_run", tmp=tmp_path / str(i)) for i in range(2)]
    for job in jobs:
        finish(job)
    names = [p.name for i in range(2)
             for p in (tmp_path / str(i) / "outputs" / "debug" / "runs").iterdir()]
    assert len(names) == 2 and names[0] != names[1]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", n) for n in names)


def test_ddp_writes_one_folder_and_its_val_dice_equals_one_process(compose_cfg, tmp_path):
    finish(train_py(*TINY, *DDP, "trainer.max_epochs=2", "test=true", "callbacks=native_evaluation",
                    tmp=tmp_path))
    runs = list((tmp_path / "outputs" / "phantom_quick" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        ".hydra", "checkpoints", "csv", "evaluation"]
    assert (run / "checkpoints" / "config.yaml").is_file()
    logged = val_dice(run)
    assert len(logged) == 2
    cfg = compose_cfg(*TINY, f"paths.data_dir={tmp_path / 'data'}")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    result = trainer.validate(model, datamodule=datamodule,
                              ckpt_path=str(run / "checkpoints" / "last.ckpt"), weights_only=True)
    assert len(datamodule.records["val"]) == 3
    assert result[0]["val/mean_dice"] == pytest.approx(logged[-1], abs=1e-6)
    # native evaluation: the test subjects of both ranks gathered into one table, each once
    with (run / "evaluation" / "scores.csv").open() as f:
        scored = [(row["case"], row["class"]) for row in csv.DictReader(f)]
    datamodule.setup("test")
    tested = sorted(r["subject"] for r in datamodule.records["test"])
    assert len(tested) >= 2 and sorted({case for case, _ in scored}) == tested
    assert len(scored) == len(set(scored)) == 104 * len(tested)


def test_ddp_trains_on_two_datasets_and_reports_each(tmp_path):
    # The nnU-Net dataset's one val subject is on one rank only: both ranks log its Dice.
    half = tmp_path / "half"
    write_phantoms(half, 6, seed=3, shape=(24, 24, 16), layout="nnunet",
                   structures=["liver", "spleen", "aorta"])
    finish(train_py(*TINY, *DDP, "trainer.max_epochs=2", "model.loss=marginal",
                    f"data.datasets=[{{name:half,root:{half}}}]", "test=true",
                    "callbacks=native_evaluation", tmp=tmp_path))
    runs = list((tmp_path / "outputs" / "phantom_quick" / "runs").iterdir())
    assert len(runs) == 1, runs
    with (runs[0] / "csv" / "version_0" / "metrics.csv").open() as f:
        logged = list(csv.DictReader(f))
    rows = [r for r in logged if r.get("val/mean_dice")]
    assert len(rows) == 2
    for row in rows:
        for key in ("val/phantoms/mean_dice", "val/half/mean_dice"):
            assert 0 <= float(row[key]) <= 1, (key, row)
    # Native evaluation gathered over both ranks: each test case scored on its dataset's classes.
    with (runs[0] / "evaluation" / "scores.csv").open() as f:
        scored = list(csv.DictReader(f))
    by_dataset = {name: {(r["case"], r["structure"]) for r in scored if r["dataset"] == name}
                  for name in ("phantoms", "half")}
    half_cases = {case for case, _ in by_dataset["half"]}
    assert half_cases and {s for _, s in by_dataset["half"]} == {"liver", "spleen", "aorta"}
    assert len(by_dataset["half"]) == 3 * len(half_cases)
    assert len(by_dataset["phantoms"]) == 104 * len({case for case, _ in by_dataset["phantoms"]})
    summary = json.loads((runs[0] / "evaluation" / "summary.json").read_text())
    assert summary["datasets"]["half"]["cases"] == len(half_cases)
    tested = [r for r in logged if r.get("test/native/half/mean_dice")]
    assert len(tested) == 1 and 0 <= float(tested[0]["test/native/phantoms/mean_dice"]) <= 1


def test_vista3d_trains_under_ddp_with_steps_that_leave_the_point_head_unused(tmp_path):
    # No clicks in any step: the point head and the encoder's point branch get no gradient,
    # which plain `ddp` refuses at the second step; ctseg picks the find-unused variant.
    output = finish(train_py(
        "experiment=vista3d_quick", "data.n_phantoms=17", "data.phantom_shape=[24,24,16]",
        "data.patch_size=[16,16,16]", "data.batch_size=2", "model.drop_point_prob=1.0",
        "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
        "callbacks.progress_bar=null", "test=false", "logger=csv", *DDP, tmp=tmp_path))
    assert "using ddp_find_unused_parameters_true" in output
    runs = list((tmp_path / "outputs" / "vista3d_quick" / "runs").iterdir())
    assert len(runs) == 1, runs
    assert len(val_dice(runs[0])) == 2
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()


def test_multirun_of_ddp_jobs_finishes_in_one_folder_per_job(tmp_path):
    finish(train_py("-m", *TINY, *DDP, "trainer.max_epochs=1", "seed=1,2", tmp=tmp_path),
           timeout=900)
    outputs = tmp_path / "outputs" / "phantom_quick"
    assert not (outputs / "runs").exists()  # no rank wrote a folder of its own
    sweeps = list((outputs / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert len(val_dice(job)) == 1
        assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    # python -m ctseg.compare over the finished multirun
    result = subprocess.run([sys.executable, "-m", "ctseg.compare", str(sweeps[0])], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    with (sweeps[0] / "comparison" / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert sorted(r["run"] for r in table) == ["0", "1"]
    best = [float(r["best val/mean_dice"]) for r in table]
    assert best == sorted(best, reverse=True)
    assert best[0] == pytest.approx(max(val_dice(job)[0] for job in jobs), abs=1e-4)
    assert {r["seed"] for r in table} == {"1", "2"}
    assert "trainer.devices" not in table[0]  # the same in every run: not a column
    text = (sweeps[0] / "comparison" / "compare.md").read_text()
    assert text.startswith("| rank | run | best val/mean_dice |")
    assert "Per-structure val Dice of the best run" in text and "| liver |" in text
    image = plt.imread(sweeps[0] / "comparison" / "val_curves.png")
    assert image.shape[0] > 300 and image[..., :3].std() > 0.05  # drawn, not blank


def test_compare_names_folders_without_a_finished_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    (tmp_path / "unfinished" / "checkpoints" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        compare_main([str(tmp_path / "empty"), str(tmp_path / "unfinished")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} (no run folder" in error
    assert f"{tmp_path / 'unfinished'} (1 run folders, none with a logged validation" in error


def test_torchrun_on_two_simulated_nodes_trains_to_the_end(tmp_path):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=ctsegtest"]
    overrides = (*TINY, *DDP, "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=2",
                 f"paths.log_dir={tmp_path / 'outputs'}", f"paths.data_dir={tmp_path / 'data'}")
    nodes = [subprocess.Popen([*torchrun, "train.py", *overrides], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    for node in nodes:
        finish(node)
    runs = list((tmp_path / "outputs" / "phantom_quick" / "runs").iterdir())
    assert [p.name for p in runs] == ["torchrun-ctsegtest"]
    run = runs[0]
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra", "checkpoints", "csv", "train.log", "train_rank1.log"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert len(val_dice(run)) == 2


def test_wandb_runs_of_a_sweep_share_a_group(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    finish(train_py("-m", *TINY, "logger=wandb", "trainer.max_epochs=1", "seed=1,2",
                    tmp=tmp_path))
    sweep = next((tmp_path / "outputs" / "phantom_quick" / "multiruns").iterdir())
    runs = [wandb_run(sweep / job) for job in ("0", "1")]
    assert [r.display_name for r in runs] == [f"{sweep.name}/0", f"{sweep.name}/1"]
    assert {r.run_group for r in runs} == {f"phantom_quick/{sweep.name}"}
    assert runs[0].run_id != runs[1].run_id


def test_slurm_launcher_renders_the_sbatch_script(compose_cfg, tmp_path, monkeypatch):
    import submitit

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cfg = compose_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                      "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                      "hydra.launcher.timeout_min=720")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path)
    queue_keys = {"timeout_min", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                  "mem_gb", "name"}
    executor.update_parameters(**{(k if k in queue_keys else f"slurm_{k}"): v
                                  for k, v in launcher.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")
                                  and v is not None})
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=720", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120"):
        assert line in script, script
    with pytest.raises(Exception, match=r"trainer.devices=-1: SLURM jobs need the number of GPUs"):
        OmegaConf.to_container(compose_cfg("hydra/launcher=slurm", "trainer=ddp").hydra.launcher,
                               resolve=True)


def test_submitit_local_jobs_run(tmp_path):
    finish(train_py("-m", *TINY, "hydra/launcher=local_submitit", "trainer.max_epochs=1",
                    "seed=1,2", tmp=tmp_path))
    sweep = next((tmp_path / "outputs" / "phantom_quick" / "multiruns").iterdir())
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert len(val_dice(sweep / job)) == 1
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # submitit's own job records


def test_a_requeued_slurm_job_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    finish(train_py(*TINY, "trainer.max_epochs=2", tmp=tmp_path))
    run = tmp_path / "outputs" / "phantom_quick" / "runs" / "slurm-4242-step0"
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets on a requeued job
    output = finish(train_py(*TINY, "trainer.max_epochs=4", tmp=tmp_path))
    assert "requeued SLURM job (restart 1): resuming from" in output
    assert [p.name for p in run.parent.iterdir()] == ["slurm-4242-step0"]
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert (first["epoch"], second["epoch"]) == (1, 3)
    assert second["global_step"] == 2 * first["global_step"]


def test_optuna_search_prunes_and_resumes_after_a_kill(tmp_path):
    search = ("hparams_search=optuna", "trainer.max_epochs=4", "hparams_search.sampler.seed=3",
              "hparams_search.pruner.n_warmup_steps=0", "hparams_search.heartbeat_interval=1",
              "hparams_search.grace_period=2", "hparams_search.params.lr.low=1e-6",
              "hparams_search.params.lr.high=3e-2")
    command = [sys.executable, "-m", "ctseg.hparams_search", *TINY, *search,
               f"paths.log_dir={tmp_path / 'outputs'}", f"paths.data_dir={tmp_path / 'data'}"]
    study_dir = tmp_path / "outputs" / "phantom_quick" / "optuna" / "phantom_quick"
    storage = f"sqlite:///{study_dir / 'study.db'}"

    first = subprocess.run([*command, "hparams_search.n_trials=4"], cwd=REPO, text=True,
                           capture_output=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    trials = optuna.load_study(study_name="phantom_quick", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert len(trials) == 4 and "PRUNED" in states and "COMPLETE" in states, states
    pruned = next(t for t in trials if t.state.name == "PRUNED")
    assert len(pruned.intermediate_values) < 4  # stopped before its last epoch

    # A second search of 7 trials is killed during its trial 5, then started again.
    killed = subprocess.Popen([*command, "hparams_search.n_trials=7"], cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (study_dir / "trial_5" / "csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed.kill()
    killed.wait()
    time.sleep(3)  # longer than the grace period: the killed trial's heartbeat is stale
    resumed = subprocess.run([*command, "hparams_search.n_trials=7"], cwd=REPO, text=True,
                             capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = optuna.load_study(study_name="phantom_quick", storage=storage).get_trials()
    assert [t.params for t in after[:4]] == [t.params for t in trials]  # kept
    assert after[5].state.name == "FAIL"  # the killed trial
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after) == 7
    assert "study phantom_quick:" in resumed.stdout
    compare_main([str(study_dir)])  # ranks the trials like any runs
    with (study_dir / "comparison" / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) >= 7 and {"model.optimizer.lr", "model.optimizer.weight_decay"} <= set(
        table[0])
