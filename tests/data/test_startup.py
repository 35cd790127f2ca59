"""train.py on an already prepared and cached root reads no NIfTI file before its first training
step: start-up checks the prepared label maps and cache entries by their manifest, file stats and
meta.json files, so it does not grow with the headers of the download's ~145,000 files. The root
is benchmarks/startup.py's simulated one (one subject's files linked for every subject)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from helpers import REPO

_spec = importlib.util.spec_from_file_location("benchmarks_startup",
                                               REPO / "benchmarks" / "startup.py")
startup = importlib.util.module_from_spec(_spec)
sys.path.insert(0, str(REPO / "benchmarks"))  # startup.py imports common.py beside it
try:
    _spec.loader.exec_module(startup)
finally:
    sys.path.remove(str(REPO / "benchmarks"))
SUBJECTS = 100


def test_start_up_on_a_prepared_cached_root_opens_no_nifti(tmp_path, monkeypatch):
    monkeypatch.setenv("CTSEG_CACHE", str(tmp_path / "cache"))
    one, root = tmp_path / "one", tmp_path / "root"
    subprocess.run([sys.executable, "-m", "ctseg.data", "phantoms", str(one), "--n", "1",
                    "--size", "wholebody", "--scale", "0.0625"], cwd=REPO, check=True,
                   capture_output=True)
    ids = startup.linked_root(one, root, SUBJECTS)
    assert len(ids) == SUBJECTS == len(list(root.glob("s*/segmentations/*.nii.gz"))) // 117
    startup.linked_prepared(one, root, ids)
    entries = startup.linked_cache(root)
    assert len([p for p in entries.iterdir() if p.is_dir()]) == SUBJECTS  # test split too

    opened = tmp_path / "opened.json"
    run = subprocess.run([sys.executable, "-c", startup.COUNT_OPENS, "train.py",
                          *startup.OVERRIDES, f"data.root={root}",
                          f"hydra.run.dir={tmp_path / 'run'}",
                          f"paths.log_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OPENED": str(opened), "WANDB_MODE": "offline"})
    assert run.returncode == 0, run.stderr[-3000:]
    # nothing was prepared or cached again, and one training step ran
    assert "writing" not in run.stderr and "caching" not in run.stderr, run.stderr[-3000:]
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    assert "train/loss" in metrics.read_text().splitlines()[0]
    assert json.loads(opened.read_text()) == []
