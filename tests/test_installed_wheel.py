"""ctseg installed from its wheel (not the clone) works from a user's folder outside the clone:
the wheel carries the config tree and the console scripts train, predict and answer --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
from helpers import REPO, SHARED_DATA

pytestmark = pytest.mark.slow
SCRIPTS = ("ctseg-train", "ctseg-predict", "ctseg-evaluate", "ctseg-export", "ctseg-visualize",
           "ctseg-compare", "ctseg-data", "ctseg-hparams-search")


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `argv` in `cwd`; fail the test with its output when it does not exit 0."""
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment (the test machine's packages, CPU torch among them, visible)
    with ctseg installed from a wheel built from a copy of the clone's files."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    tracked = subprocess.run(["git", "ls-files", "ctseg", "conf", "pyproject.toml", "setup.py",
                              "MANIFEST.in", "README.md"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(source)], tmp, env)
    wheel = next((tmp / "dist").glob("ctseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ctseg/conf/train.yaml" in names and "ctseg/conf/experiment/phantom_quick.yaml" in names
    assert "ctseg/resources/totalseg_v2_classes.json" in names
    run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], tmp, env)
    run([str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
         str(wheel)], tmp, env)
    return tmp / "venv"


def test_the_installed_wheel_trains_and_predicts_outside_the_clone(venv, tmp_path):
    user = tmp_path / "user"  # a user's working folder, outside the clone
    user.mkdir()
    bin_dir = venv / "bin"
    env = {**os.environ, "CTSEG_SHARED_DATA": str(SHARED_DATA), "PYTHONPATH": "",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    where = run(["python", "-c", "import ctseg, ctseg.config as c; print(ctseg.__file__); "
                 "print(c.CONFIG_DIR)"], user, env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # not the clone's ctseg
    assert all((bin_dir / script).is_file() for script in SCRIPTS)

    run(["ctseg-train", "experiment=phantom_quick", "trainer.max_steps=2", "data.n_phantoms=4",
         "data.phantom_shape=[24,24,16]", "data.patch_size=[16,16,16]", "test=false"], user, env)
    checkpoints = sorted(user.glob("outputs/phantom_quick/runs/*/checkpoints/last.ckpt"))
    assert len(checkpoints) == 1
    ct = SHARED_DATA / "totalseg_mini" / "s0001" / "ct.nii.gz"
    run(["ctseg-predict", f"ckpt={checkpoints[0]}", f"input={ct}", "output=predictions"], user,
        env)
    assert nib.load(user / "predictions" / "ct" / "labels.nii.gz").shape == nib.load(ct).shape
    help_text = run(["ctseg-predict", "--help"], user, env).stdout
    assert "== ctseg predict.py ==" in help_text and "overwrite=true" in help_text
