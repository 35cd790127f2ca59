"""Shared fixtures: the real TotalSegmentator crop in ../shared and writable copies of it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHARED_DATA, column, compose_in, metric_rows
from suite_schedule import LONGEST_FIRST, TRAINED_FIXTURES

# Least validation mean Dice of each member of `ensemble_members` (measured: 0.142, 0.206).
MEMBERS_LEARNED = 0.1


def pytest_configure(config: pytest.Config) -> None:
    """Share the CPU cores between pytest-xdist workers: each worker, and every process its tests
    start, runs cores // workers threads. PyTorch's default (a thread per core in every process)
    oversubscribes a 2-core machine several times over, and its OpenMP kernels then slow down by
    far more than the oversubscription (a 3-minute training took 20 minutes). An
    OMP_NUM_THREADS set by the user wins."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, or a run without workers
        return
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the tests for pytest-xdist (`--dist loadgroup`): a module's tests run on one worker,
    so its module fixtures are built once, and so do all modules using a session fixture that
    trains; a test marked with a group of its own keeps it. The longest groups first
    (LONGEST_FIRST; pyproject.toml's `--no-loadscope-reorder` keeps this order)."""
    by_module = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        trained = [f for f in TRAINED_FIXTURES if f in getattr(item, "fixturenames", ())]
        by_module[module] = trained[0] if trained else by_module.get(module, module)
    group = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        group[item.nodeid] = mark.args[0] if mark else by_module[item.nodeid.split("::")[0]]
        if not mark:
            item.add_marker(pytest.mark.xdist_group(group[item.nodeid]))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group[item.nodeid], len(rank)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point ctseg's default cache at a per-test folder so tests never touch ~/.cache."""
    monkeypatch.setenv("CTSEG_CACHE", str(tmp_path_factory.mktemp("ctseg_cache")))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real crop, `<shared>/data/totalseg_mini` (read-only)."""
    root = SHARED_DATA / "totalseg_mini"
    if not (root / "meta.csv").is_file():
        pytest.fail(f"shared test data not found at {root}; set CTSEG_SHARED_DATA")
    return root


@pytest.fixture
def mini_copy(shared_data: Path, tmp_path: Path) -> Path:
    """A writable copy of the shared crop (without the v2 label file), for tests that break it."""
    root = tmp_path / "totalseg_mini"
    shutil.copytree(shared_data, root, ignore=shutil.ignore_patterns("label_totalseg_v2.nii.gz"))
    return root


@pytest.fixture
def two_subjects(shared_data: Path, tmp_path: Path) -> Path:
    """A writable download of two subjects (s0001 train, s0002 val), both copies of the crop."""
    root = tmp_path / "two_subjects"
    for image_id in ("s0001", "s0002"):
        shutil.copytree(shared_data / "s0001", root / image_id,
                        ignore=shutil.ignore_patterns("label_totalseg_v2.nii.gz"))
    (root / "meta.csv").write_text("image_id;split\ns0001;train\ns0002;val\n")
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 and mtime of every file under root, keyed by relative path."""
    return {str(p.relative_to(root)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:"
            f"{p.stat().st_mtime_ns}" for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tree_digest():
    """Function giving the content hash and mtime of every file under a folder."""
    return _tree_digest


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """Compose `conf/train.yaml` with overrides, every path pointed into tmp_path."""
    from hydra.core.global_hydra import GlobalHydra

    yield lambda *overrides, config_name="train": compose_in(tmp_path, *overrides,
                                                             config_name=config_name)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def vista3d_quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of `python train.py experiment=vista3d_quick` (the CLI, its defaults, with
    native-resolution test evaluation), shared by the learning test and the VISTA3D prediction
    tests."""
    tmp = tmp_path_factory.mktemp("vista3d_quick")
    run = tmp / "run"
    command = [sys.executable, "train.py", "experiment=vista3d_quick", "logger=csv",
               "callbacks=native_evaluation", f"hydra.run.dir={run}",
               f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'outputs'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def ensemble_members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two distinct trained checkpoints (seeds 0 and 1 of benchmarks/ensemble.py's short
    phantom_quick recipe, run by its `--train-members`), shared by the ensemble tests and the
    ensemble and training benchmarks."""
    tmp = tmp_path_factory.mktemp("ensemble_members")
    env = {**os.environ, "CTSEG_CACHE": str(tmp / "cache"), "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "benchmarks/ensemble.py", "--train-members",
                             str(tmp / "runs"), "--models", "2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    members = [Path(line) for line in result.stdout.split()]
    assert len(members) == 2 and all(m.is_file() for m in members), result.stdout
    for member in members:  # each learned: held-out Dice well above a random network's ~0.01
        dice = column(metric_rows(member.parents[1]), "val/mean_dice")
        assert dice[-1][1] >= MEMBERS_LEARNED, (member, dice)
    return members


@pytest.fixture(scope="session")
def gpu_report_smoke(tmp_path_factory: pytest.TempPathFactory, ensemble_members: list[Path]
                     ) -> Path:
    """The output folder of `benchmarks/gpu_report.py --device cpu --smoke` with every section
    (the ensemble section on `ensemble_members`; a budget the loaded CPU cannot pass), all
    sections at the same time, one thread per process: tests/test_gpu_report.py checks the
    report, tests/test_benchmarks.py reads the JSON of the benchmark scripts it ran at their
    smallest settings."""
    out = tmp_path_factory.mktemp("gpu_report_smoke") / "report"
    env = {**os.environ, "CTSEG_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1",
           "CTSEG_CACHE": str(out.parent / "cache"), "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--device", "cpu",
                           "--smoke", "--jobs", "8", "--budget-min", "60", "--members",
                           *map(str, ensemble_members), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out / "stdout.txt").write_text(done.stdout)
    return out


@pytest.fixture(scope="session")
def bundle_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed random state dict of the wholeBody bundle's network, saved as its `model.pt`."""
    from ctseg.reference import wholebody_bundle

    torch.manual_seed(20261126)
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    torch.save(wholebody_bundle.network().state_dict(), path)
    return path
