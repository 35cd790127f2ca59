"""predict.py's case loop with reading and writing overlapped (overlap_io) gives the outputs,
failures and timing entries of the plain loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from ctseg.errors import reported
from ctseg.inference.outputs import TIMING_FILE
from ctseg.inference.overlap import InPlace
from ctseg.inference.runner import run


def predict(ckpt: Path, source: Path, output: Path, **options) -> int:
    """predict.py's run with its error reporting: the exit status it would give."""
    cfg = OmegaConf.create({"ckpt": str(ckpt), "input": str(source), "output": str(output),
                            "device": "cpu", "progress": False, **options})
    try:
        with reported("predict.py"):
            return run(cfg)
    except SystemExit as exit_info:
        return int(exit_info.code)


def test_in_place_calls_run_when_their_result_is_asked_for():
    calls = []
    with InPlace() as executor:
        future = executor.submit(calls.append, 1)
        assert calls == []
        future.result()
        future.result()
    assert calls == [1]
    failing = InPlace().submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result()


def test_overlapped_cases_equal_the_plain_loop_and_a_corrupt_one_fails_alone(
        tiny_ckpt, shared_ct, tmp_path, caplog):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ct = nib.load(shared_ct)
    data = np.asanyarray(ct.dataobj)
    for name, corner in (("a", 0), ("c", 10), ("d", 20)):
        crop = data[corner:corner + 50, corner:corner + 40, :20]
        nib.save(nib.Nifti1Image(crop, ct.affine), inputs / f"{name}.nii.gz")
    (inputs / "b.nii.gz").write_bytes((inputs / "a.nii.gz").read_bytes()[:300])  # truncated
    results = {}
    for overlap in (False, True):
        out = tmp_path / f"out_{overlap}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ctseg"):
            assert predict(tiny_ckpt, inputs, out, overlap_io=overlap) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        timing = json.loads((out / TIMING_FILE).read_text())
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                       if p.is_file() and p.name != TIMING_FILE)
        arrays = {f: np.asarray(nib.load(out / f).dataobj) for f in files if f.endswith(".gz")}
        results[overlap] = (errors, timing, files, arrays)
    (plain_errors, plain_timing, plain_files, plain_arrays) = results[False]
    (errors, timing, files, arrays) = results[True]
    assert len(errors) == 1 and str(inputs / "b.nii.gz") in errors[0]
    assert errors == plain_errors
    assert timing["failed"] == plain_timing["failed"] and timing["failed"][0]["case"] == "b"
    assert [c["case"] for c in timing["cases"]] == ["a", "c", "d"]
    assert [c["case"] for c in plain_timing["cases"]] == ["a", "c", "d"]
    assert files == plain_files and {f.split("/")[0] for f in files} == {"a", "c", "d"}
    assert all(f"{case}/segmentations/liver.nii.gz" in files for case in "acd")
    for name, array in arrays.items():
        assert np.array_equal(array, plain_arrays[name]), name
    # a rerun skips every finished case and retries only the failed one
    assert predict(tiny_ckpt, inputs, tmp_path / "out_True", overlap_io=True) == 1
    rerun = json.loads((tmp_path / "out_True" / TIMING_FILE).read_text())
    assert rerun["skipped"] == ["a", "c", "d"] and rerun["cases"] == []
