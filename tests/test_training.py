"""End-to-end training runs through `ctseg.training.train` and `train.py` on phantoms, on CPU."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import column, compose_in, metric_rows, scanner_ct, wandb_records, wandb_run
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from ctseg.errors import Interrupted
from ctseg.inference.runner import run as predict
from ctseg.training import train

REPO = Path(__file__).resolve().parents[1]
# A run of one 16^3 patch batch per epoch on 4 small phantoms (2 train, 1 val, 1 test).
TINY = (
    "experiment=phantom_quick",
    "model.init_filters=8",
    "data.n_phantoms=4",
    "data.phantom_shape=[24,24,16]",
    "data.patch_size=[16,16,16]",
    "data.batch_size=2",
    "data.samples_per_volume=1",
    "data.extra_roots=[]",
    "model.sw_batch_size=2",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "test=false",
)

pytestmark = pytest.mark.slow

# experiment=phantom_quick as docs/training.md ("Experiments") and the README state it, asserted
# within 0.05: val mean Dice (3 held-out val phantoms) at the first and last validation, test
# mean Dice and per structure (3 test phantoms; the table's vertebrae T11-L3 are a range).
PHANTOM_QUICK_VAL = (0.13, 0.78)
PHANTOM_QUICK_TEST = 0.79
PHANTOM_QUICK_STRUCTURES = {
    "liver": 0.91, "spleen": 0.84, "stomach": 0.76, "kidney_right": 0.72, "kidney_left": 0.80,
    "lung_lower_lobe_right": 0.90, "lung_lower_lobe_left": 0.93, "aorta": 0.79,
    "inferior_vena_cava": 0.70, "pancreas": 0.59, "gallbladder": 0.68, "autochthon_right": 0.60,
    "autochthon_left": 0.66}
PHANTOM_QUICK_VERTEBRAE = (0.83, 0.89)
# experiment=add_class_quick (docs/training.md "Adding classes", its experiment file): held-out
# tumour Dice; the old classes' mean test Dice before and after; the largest gain and drop of
# one structure.
ADD_CLASS = {"tumour": 0.60, "mean_before": 0.79, "mean_after": 0.78, "max_gain": 0.07,
             "max_drop": 0.16}


@pytest.fixture(scope="module")
def phantom_quick_run(tmp_path_factory: pytest.TempPathFactory
                      ) -> tuple[Path, dict[str, float], dict[str, Any]]:
    """`experiment=phantom_quick` trained once, with export and native evaluation: its run
    folder, final metrics and objects, shared by the learning test and the adding-a-class test."""
    tmp = tmp_path_factory.mktemp("phantom_quick")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CTSEG_CACHE", str(tmp / "cache"))
        env.setenv("WANDB_MODE", "offline")
        metrics, objects = train(compose_in(tmp, "experiment=phantom_quick",
                                            "callbacks=[export,native_evaluation]",
                                            "callbacks.progress_bar=null"))
    return tmp / "run", metrics, objects


def test_skipping_air_keeps_a_trained_models_labels(phantom_quick_run, shared_data, tmp_path):
    ckpt = phantom_quick_run[2]["trainer"].checkpoint_callback.best_model_path
    ct = scanner_ct(shared_data / "s0001" / "ct.nii.gz", tmp_path / "ct.nii.gz")
    labels, windows = {}, {}
    for skip in (False, True):
        out = tmp_path / f"skip_air_{skip}"
        assert predict({"ckpt": ckpt, "input": str(ct), "output": str(out), "masks": False,
                        "progress": False, "sw": {"skip_air": skip, "roi_size": [16, 16, 16]}}
                       ) == 0
        labels[skip] = np.asanyarray(nib.load(out / "ct" / "labels.nii.gz").dataobj)
        windows[skip] = json.loads((out / "timing.json").read_text())["cases"][0].get("windows")
    # The crop in a 500 mm field of view, windows of 96 mm at 6 mm: the windows in air around it
    # are not computed (measured: 38 of 49), and the trained model's labels stay (99.9993 %).
    assert windows[False] is None
    assert 0 < windows[True]["computed"] < windows[True]["grid"]
    assert int((labels[False] > 0).sum()) > 1000
    assert float((labels[True] == labels[False]).mean()) >= 0.999


def test_phantom_quick_learns(phantom_quick_run, tmp_path):
    run, metrics, objects = phantom_quick_run
    rows = metric_rows(run)
    losses = column(rows, "train/loss_epoch")
    assert [e for e, _ in losses] == list(range(130))
    # Measured: 5.65 at epoch 0, 0.91 at the end (105 classes, 7 steps per epoch).
    assert losses[-1][1] < 0.3 * losses[0][1]
    dice = column(rows, "val/mean_dice")
    assert [e for e, _ in dice] == [25, 51, 77, 103, 129]
    test = {k.removeprefix("test/dice/"): v for k, v in metrics.items()
            if k.startswith("test/dice/")}
    assert len(test) >= 17  # the 18 phantom structures (gallbladder is sometimes absent)
    measured = {"val": (dice[0][1], dice[-1][1]), "test": metrics["test/mean_dice"], **test}
    assert dice[0][1] == pytest.approx(PHANTOM_QUICK_VAL[0], abs=0.05), measured
    assert dice[-1][1] == pytest.approx(PHANTOM_QUICK_VAL[1], abs=0.05), measured
    assert metrics["test/mean_dice"] == pytest.approx(PHANTOM_QUICK_TEST, abs=0.05), measured
    for name, stated in PHANTOM_QUICK_STRUCTURES.items():
        assert test[name] == pytest.approx(stated, abs=0.05), (name, measured)
    low, high = PHANTOM_QUICK_VERTEBRAE
    vertebrae = [v for k, v in test.items() if k.startswith("vertebrae_")]
    assert len(vertebrae) == 5 and low - 0.05 <= min(vertebrae) <= max(vertebrae) <= high + 0.05
    assert objects["trainer"].global_step == 130 * objects["trainer"].num_training_batches
    saved = OmegaConf.load(run / "checkpoints" / "config.yaml")
    assert "${" not in (run / "checkpoints" / "config.yaml").read_text()
    assert (saved.task_name, saved.model.num_classes, saved.data.patch_size) == (
        "phantom_quick", 105, [32, 32, 24])
    # callbacks=export: the best checkpoint exported, parity on a validation window, logged.
    manifest = json.loads((run / "export" / "export.json").read_text())
    assert manifest["source"] == objects["trainer"].checkpoint_callback.best_model_path
    assert sorted(manifest["formats"]) == ["onnx", "torchscript"]
    for fmt, entry in manifest["formats"].items():
        report = json.loads((run / "export" / f"{entry['file']}.parity.json")
                            .read_text())
        assert report["passed"] and report["window"] == [1, 1, 32, 32, 24]
        assert report["argmax_agreement"] >= 0.999 and report["max_abs_diff"] < 1e-3
        assert column(metric_rows(run), f"export/{fmt}/argmax_agreement")
    # callbacks native_evaluation: the run folder ends with the table that predict.py with the best
    # checkpoint and python -m ctseg.evaluate on the test split give.
    evaluation = run / "evaluation"
    native = json.loads((evaluation / "summary.json").read_text())
    assert len(native["cases"]) == 3 and native["tolerance_mm"] == 3.0
    assert native["overall"]["dice"]["mean"] >= 0.5 and native["overall"]["nsd"]["mean"] >= 0.5
    assert metrics["test/native/mean_case_dice"] == pytest.approx(native["overall"]["dice"]["mean"])
    cases = tmp_path / "test_cases"
    for record in objects["datamodule"].records["test"]:
        (cases / record["subject"]).mkdir(parents=True)
        (cases / record["subject"] / "ct.nii.gz").symlink_to(record["image"])
    best = objects["trainer"].checkpoint_callback.best_model_path
    root = Path(objects["datamodule"].roots[0])
    for command in (["predict.py", f"ckpt={best}", f"input={cases}", f"output={tmp_path / 'p'}",
                     "masks=false"],
                    ["-m", "ctseg.evaluate", f"pred={tmp_path / 'p'}", f"gt={root}",
                     "version=v1", "split=test"]):
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    with open(evaluation / "scores.csv") as ours, \
            open(tmp_path / "p" / "evaluation" / "scores.csv") as theirs:
        key = lambda row: (row["case"], int(row["class"]))  # noqa: E731
        mine, reference = (sorted(csv.DictReader(f), key=key) for f in (ours, theirs))
    assert len(mine) == len(reference) == 3 * 104
    for a, b in zip(mine, reference, strict=True):
        assert key(a) == key(b)
        for metric in ("dice", "nsd"):
            assert float(a[metric]) == pytest.approx(float(b[metric]), abs=1e-6, nan_ok=True)


def test_test_alone_tests_the_checkpoint_ckpt_path_names(phantom_quick_run, compose_cfg):
    """`train.py ckpt_path=<ckpt> train=false test=true` tests that checkpoint's weights: the
    same test Dice as the run's own test stage of it (it tested an untrained network, ~0.001);
    with the test phantoms' images from a float16 disk cache, within 0.005 of it."""
    _, old_metrics, old = phantom_quick_run
    best = old["trainer"].checkpoint_callback.best_model_path
    test_alone = ("experiment=phantom_quick", f"ckpt_path={best}", "train=false", "test=true",
                  "callbacks.progress_bar=null")
    metrics, _ = train(compose_cfg(*test_alone))
    assert metrics["test/mean_dice"] == pytest.approx(old_metrics["test/mean_dice"], abs=1e-4)
    # The same network on the test phantoms read from a float16 disk cache (docs/dataset.md,
    # "float16 or float32"; measured -0.0011)
    half, _ = train(compose_cfg(*test_alone, "data/cache=disk", "data.cache_image_dtype=float16"))
    assert half["test/mean_dice"] == pytest.approx(old_metrics["test/mean_dice"], abs=0.005)
    images = list((Path(os.environ["CTSEG_CACHE"]) / "tensors").rglob("image.npy"))
    assert len(images) == 3 and {np.load(p, mmap_mode="r").dtype for p in images} == {
        np.dtype(np.float16)}


def test_a_class_added_to_phantom_quick_is_learnt_and_the_old_ones_kept(phantom_quick_run,
                                                                        compose_cfg, tmp_path):
    _, old_metrics, old = phantom_quick_run
    best = old["trainer"].checkpoint_callback.best_model_path
    metrics, objects = train(compose_cfg("experiment=add_class_quick", f"model.pretrained={best}",
                                         "callbacks.progress_bar=null"))
    assert objects["model"].label_names[-1] == "liver_tumour"
    report = json.loads((tmp_path / "run" / "forgetting.json").read_text())
    assert report["added"] == ["liver_tumour"] and report["old_classes"] >= 17
    # "Before" is the checkpoint's own test Dice, as phantom_quick's test stage measured it.
    for row in report["structures"]:
        assert row["before"] == pytest.approx(old_metrics[f"test/dice/{row['structure']}"],
                                              abs=1e-4), row
    # Held out: the tumour set's test cases (imagesTs), which label the tumour only.
    changes = [row["change"] for row in report["structures"]]
    measured = {"tumour": metrics["test/dice/liver_tumour"], "mean_before": report["mean_before"],
                "mean_after": report["mean_after"], "max_gain": max(changes),
                "max_drop": report["max_drop"]}
    for name, stated in ADD_CLASS.items():
        assert measured[name] == pytest.approx(stated, abs=0.05), (name, measured)
    assert report["mean_after"] >= report["mean_before"] - 0.05
    assert metrics["test/forgetting/max_drop"] == pytest.approx(report["max_drop"])
    assert "| liver |" in (tmp_path / "run" / "forgetting.md").read_text()


def test_resume_from_run_folder_continues(compose_cfg, tmp_path):
    run = tmp_path / "run"
    _, first = train(compose_cfg(*TINY, "trainer.max_epochs=2"))
    steps = first["trainer"].global_step
    assert steps == 2 * first["trainer"].num_training_batches
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (steps, 1)

    _, second = train(compose_cfg(*TINY, "trainer.max_epochs=4", f"ckpt_path={run}"))
    assert second["trainer"].global_step == 2 * steps
    assert second["trainer"].current_epoch == 4
    resumed = column(metric_rows(run, version=1), "train/loss_epoch")
    assert [epoch for epoch, _ in resumed] == [2, 3]


def test_resume_last_in_same_output_dir(compose_cfg):
    _, first = train(compose_cfg(*TINY, "trainer.max_epochs=1"))
    _, second = train(compose_cfg(*TINY, "trainer.max_epochs=2", "ckpt_path=last"))
    assert second["trainer"].global_step == 2 * first["trainer"].global_step


def test_missing_resume_checkpoint_names_the_path(compose_cfg, tmp_path):
    message = r"nothing: no checkpoint at .*nothing; give a \.ckpt file"
    with pytest.raises(FileNotFoundError, match=message):
        train(compose_cfg(*TINY, f"ckpt_path={tmp_path / 'nothing'}"))


# The interrupted run: TINY at two single-patch steps per epoch and no validation, so a step is
# short and last.ckpt is written at every epoch end and on the signal.
STOPPED = ("data.batch_size=1", "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=1000",
           "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1")
STOPPED_STEPS = 12


def stopped_once_logging(command: list[str], metrics: Path, signum: int) -> tuple[int, str]:
    """Run `command` and send it `signum` once it has logged a training step to `metrics` (it
    trains); its exit status and output."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not metrics.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.is_file(), f"no training step logged in time; exit code {proc.poll()}"
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in output, output[-3000:]
    return proc.returncode, output


def resume_command(output: str, signal_name: str, last: Path) -> list[str]:
    """The one line an interrupted train.py ends with, naming the signal and the epoch and step
    that last.ckpt holds; the command it gives, as argv (this interpreter for `python`)."""
    saved = torch.load(last, weights_only=True)
    said = (f"train.py: interrupted by {signal_name} at epoch {saved['epoch']}, step "
            f"{saved['global_step']}; resume with: ")
    lines = [line for line in output.splitlines() if "resume with" in line]
    assert len(lines) == 1 and lines[0].startswith(said), (said, output[-3000:])
    words = shlex.split(lines[0].removeprefix(said))
    assert words[:2] == ["python", "train.py"], words
    return [sys.executable, *words[1:]]


def test_an_interrupted_run_says_how_to_resume_and_the_command_finishes_it(tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    command = [sys.executable, "train.py", *TINY, *STOPPED, f"hydra.run.dir={run}",
               f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}"]
    status, output = stopped_once_logging(command, run / "csv/version_0/metrics.csv",
                                          signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, output[-3000:]  # 143, as a shell reports a kill
    resume = resume_command(output, "SIGTERM", last)
    assert resume[2:] == [f"ckpt_path={run}"]
    stopped = torch.load(last, weights_only=True)["global_step"]
    assert 1 <= stopped < STOPPED_STEPS

    finished = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Traceback" not in finished.stdout + finished.stderr
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (5, STOPPED_STEPS)


class CtrlC(Callback):
    """Press Ctrl-C after the first training step: the KeyboardInterrupt that Python's SIGINT
    handler raises in the main thread."""

    def on_train_batch_end(self, *args: Any) -> None:
        """Interrupt once."""
        raise KeyboardInterrupt


def test_ctrl_c_is_an_interruption_resumable_from_the_run_folder(compose_cfg, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Interrupted) as stop:
            train(compose_cfg(*TINY, *STOPPED), extra_callbacks=[CtrlC()])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after one
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert (stop.value.code, stop.value.signal) == (128 + signal.SIGINT, signal.SIGINT)
    assert (stop.value.epoch, stop.value.step) == (saved["epoch"], saved["global_step"]) == (0, 1)
    assert stop.value.resume_from == tmp_path / "run"


def test_a_run_shorter_than_its_validation_interval_keeps_last_ckpt(compose_cfg, tmp_path):
    """Validation every 5 epochs, 2 epochs run: last.ckpt holds the end of the run, written
    atomically (no temporary file beside it), and resuming from it continues."""
    _, first = train(compose_cfg(*TINY, "trainer.max_epochs=2",
                                 "trainer.check_val_every_n_epoch=5"))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "last.ckpt"]
    saved = torch.load(folder / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (first["trainer"].global_step, 1)
    _, second = train(compose_cfg(*TINY, "trainer.max_epochs=3",
                                  "trainer.check_val_every_n_epoch=5", "ckpt_path=last"))
    assert second["trainer"].global_step == 3 * first["trainer"].num_training_batches


def test_bf16_mixed_runs_on_cpu(compose_cfg):
    metrics, objects = train(compose_cfg(*TINY, "debug=fast_dev_run",
                                         "precision=bf16-mixed"))
    assert objects["trainer"].precision == "bf16-mixed"
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_fast_dev_run_writes_no_checkpoint(compose_cfg, tmp_path):
    metrics, objects = train(compose_cfg(*TINY, "debug=fast_dev_run"))
    assert objects["trainer"].global_step == 1
    assert "val/mean_dice" in metrics
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_export_without_a_best_checkpoint_exports_the_current_weights(compose_cfg, tmp_path):
    train(compose_cfg(*TINY, "callbacks=export", "callbacks.model_checkpoint=null",
                      "callbacks.last_checkpoint=null", "+trainer.enable_checkpointing=false",
                      "callbacks.early_stopping=null", "trainer.max_epochs=1",
                      "callbacks.export.formats=[onnx]"))
    manifest = json.loads((tmp_path / "run" / "export" / "export.json").read_text())
    assert Path(manifest["source"]).name == "current.ckpt"
    assert not Path(manifest["source"]).exists()  # a temporary checkpoint, removed
    assert manifest["formats"]["onnx"]["parity"]["passed"]
    assert manifest["formats"]["onnx"]["parity"]["window"] == [1, 1, 16, 16, 16]


def test_overfit_uses_one_batch(compose_cfg):
    metrics, objects = train(compose_cfg(*TINY, "debug=overfit", "trainer.max_epochs=3",
                                         "trainer.check_val_every_n_epoch=3"))
    trainer = objects["trainer"]
    assert trainer.num_training_batches == 1
    assert trainer.global_step == 3
    assert "val/mean_dice" in metrics


def test_wandb_offline_run_is_named_grouped_and_resumed(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "")
    metrics, _ = train(compose_cfg(*TINY, "logger=wandb", "trainer.max_epochs=1", "test=true"))
    run = tmp_path / "run"
    first = wandb_run(run)
    assert (first.display_name, first.run_group, first.job_type) == ("run", "phantom_quick",
                                                                      "train")
    assert list(first.tags) == ["phantoms", "quick"]
    assert (run / "wandb_id.txt").read_text().strip() == first.run_id
    records = wandb_records(run)
    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    keys = {item.key for item in config.update}
    assert {"model", "data", "trainer", "seed"} <= keys
    logged = {item.key or "/".join(item.nested_key) for r in records
              if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert "test/dice_table/nrows" in logged and "val/mean_dice" in logged
    tables = list(run.glob("wandb/offline-run-*/files/media/table/test/dice_table_*.table.json"))
    rows = json.loads(tables[0].read_text())["data"]
    assert {name for name, _ in rows} == {k.removeprefix("test/dice/") for k in metrics
                                         if k.startswith("test/dice/")}
    # Resume from the run folder into another folder: the same W&B run continues.
    shutil.move(run, tmp_path / "first")
    train(compose_cfg(*TINY, "logger=wandb", "trainer.max_epochs=2",
                      f"ckpt_path={tmp_path / 'first'}"))
    assert (run / "wandb_id.txt").read_text().strip() == first.run_id
    assert wandb_run(run).run_id == first.run_id


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_trains(compose_cfg):
    metrics, objects = train(compose_cfg(*TINY, "debug=fast_dev_run", "trainer=gpu"))
    assert objects["trainer"].precision == "16-mixed"
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_trains_vista3d_automatic_and_point_stage(compose_cfg):
    """AMP steps of the small VISTA3D on the GPU: the automatic branch (vista3d_quick: no
    clicks, the whole network trains) and the point stage (clicks only, the point head only)
    each take one finite step, and the checkpoint's click-step count says which had clicks."""
    tiny = ("experiment=vista3d_quick", "data.n_phantoms=4", "data.phantom_shape=[24,24,16]",
            "data.patch_size=[16,16,16]", "data.batch_size=2", "debug=fast_dev_run",
            "trainer=gpu")
    point = ("model.trainable=point_head", "model.drop_label_prob=1.0",
             "model.drop_point_prob=0.0")
    for overrides, clicks in (((), 0), (point, 1)):
        metrics, objects = train(compose_cfg(*tiny, *overrides))
        model = objects["model"]
        assert objects["trainer"].precision == "16-mixed" and objects["trainer"].global_step == 1
        assert next(model.parameters()).device.type == "cuda"
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        assert model.click_steps == clicks
        trained = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
        assert ("class_head" in trained) == (not clicks) and "point_head" in trained, trained


def test_same_seed_gives_the_same_run(compose_cfg, tmp_path):
    losses = []
    for seed in (7, 7, 8):
        metrics, _ = train(compose_cfg(*TINY, "trainer.max_epochs=2", f"seed={seed}",
                                       "trainer.deterministic=true"))
        losses.append(metrics["train/loss_epoch"])
    assert losses[0] == losses[1]
    assert losses[2] != losses[0]
