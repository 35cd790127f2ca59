"""Export (CLI, parity, bad files) and prediction with every backend giving the same labels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import truncate
from omegaconf import OmegaConf

from ctseg.errors import ConfigError, reported
from ctseg.export.__main__ import run as export_run
from ctseg.export.exporter import export_model, sample_window
from ctseg.export.formats import trt_unavailable
from ctseg.export.parity import ParityError
from ctseg.export.runtime import ExportFileError, load_runner, sha256_of
from ctseg.inference.runner import run
from ctseg.models.loading import EXPORT_MANIFEST, load_model
from ctseg.vista3d_labels import vista3d_labels

REPO = Path(__file__).resolve().parents[2]
HAS_TRT = trt_unavailable() is None


def export_cfg(ckpt: Path, output: Path, *overrides: str):
    """conf/export.yaml composed with `overrides`, as the CLI composes it."""
    from hydra import compose, initialize_config_dir

    from ctseg.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("export", overrides=[f"ckpt={ckpt}", f"output={output}", *overrides])


def predict(ckpt: Path, ct: Path, output: Path, **options) -> int:
    """predict.py's run with its error reporting: the exit status it would give."""
    cfg = OmegaConf.create({"ckpt": str(ckpt), "input": str(ct), "output": str(output),
                            "device": "cpu", "progress": False, "masks": False, **options})
    try:
        with reported("predict.py"):
            return run(cfg)
    except SystemExit as exit_info:
        return int(exit_info.code)


def labels(output: Path, ct: Path) -> np.ndarray:
    """The label map predict wrote for `ct`."""
    case = ct.name.removesuffix(".nii.gz")
    return np.asarray(nib.load(output / case / "labels.nii.gz").dataobj)


@pytest.fixture(scope="module")
def exported(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m ctseg.export` (the CLI, a real process) of the tiny checkpoint, TensorRT asked
    for too; the export folder."""
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "ctseg.export", f"ckpt={tiny_ckpt}", f"output={out}",
         "formats=[torchscript,onnx,trt_fp16]"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if not line.startswith("[")]  # logs
    assert lines[0].startswith("torchscript  model.ts") and "argmax agreement 1.00000" in lines[0]
    assert lines[1].startswith("onnx         model.onnx")
    if not HAS_TRT:
        assert lines[2] == f"trt_fp16     skipped: {trt_unavailable()}"
    return out


def test_export_writes_files_parity_reports_and_a_manifest(exported: Path, tiny_ckpt: Path):
    manifest = json.loads((exported / EXPORT_MANIFEST).read_text())
    assert manifest["kind"] == "segresnet" and len(manifest["label_names"]) == 105
    assert manifest["roi_size"] == [32, 32, 32] and manifest["pipeline"]["spacing"] == [4.0] * 3
    assert manifest["source"] == str(tiny_ckpt)
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        report = json.loads((exported / f"{name}.parity.json").read_text())
        assert manifest["formats"][fmt]["file"] == name and (exported / name).stat().st_size > 1e5
        assert manifest["formats"][fmt]["sha256"] == sha256_of(exported / name)
        assert report["passed"] and report["window"] == [1, 1, 32, 32, 32]
        assert report["argmax_agreement"] == 1.0
        assert report["max_abs_diff"] < (1e-5 if fmt == "onnx" else 1e-7)
    if not HAS_TRT:
        assert set(manifest["skipped"]) == {"trt_fp16"}
        assert not (exported / "model_trt_fp16.ts").exists()


def test_exports_run_other_window_and_batch_sizes(exported: Path, tiny_ckpt: Path):
    net = load_model(tiny_ckpt, {}, {}).net
    windows = torch.randn(2, 1, 48, 32, 40)
    with torch.no_grad():
        reference = net(windows)
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        logits = load_runner(exported / name, fmt, "cpu", sha256_of(exported / name))(windows)
        assert logits.shape == (2, 105, 48, 32, 40)
        assert torch.allclose(logits, reference, atol=1e-4)


def test_every_cpu_backend_predicts_the_same_labels(exported, tiny_ckpt, shared_ct, tmp_path):
    assert predict(tiny_ckpt, shared_ct, tmp_path / "torch", channels_last=False) == 0
    reference = labels(tmp_path / "torch", shared_ct)
    assert len(np.unique(reference)) > 10
    runs = {"channels_last": (tiny_ckpt, {"backend": "torch", "channels_last": True}),
            "folder_auto": (exported, {}),
            "torchscript_file": (exported / "model.ts", {}),
            "onnxruntime": (exported, {"backend": "onnxruntime"}),
            "onnx_on_the_fly": (tiny_ckpt, {"backend": "onnxruntime"}),
            "torchscript_on_the_fly": (tiny_ckpt, {"backend": "torchscript"})}
    agreement = {}
    for name, (ckpt, options) in runs.items():
        assert predict(ckpt, shared_ct, tmp_path / name, **options) == 0, name
        agreement[name] = float((labels(tmp_path / name, shared_ct) == reference).mean())
    # Kernels differ between backends and thread counts (float32 summation order), which can
    # flip a near-tie between two classes; the export parity gate allows the same.
    assert min(agreement.values()) >= 0.9999, agreement


@pytest.mark.parametrize(("name", "fmt"), [("model.onnx", "onnx"), ("model.ts", "torchscript")])
def test_a_damaged_export_is_named_and_predict_writes_nothing(
        exported, shared_ct, tmp_path, capsys, name, fmt):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    truncate(broken / name)
    # export.json's digest is checked before the file is loaded: a changed file is not run
    out = tmp_path / "pred"
    assert predict(broken / name, shared_ct, out) == 1
    assert (f"{broken / name}: its SHA-256 differs from the one export.json records"
            in capsys.readouterr().err)
    assert not (out / "ct").exists()
    # a file that is not a model at all is named by the loader
    with pytest.raises(ExportFileError, match=rf"{broken / name}: not a readable {fmt} export"):
        load_runner(broken / name, fmt, "cpu", sha256_of(broken / name))


def test_a_missing_or_foreign_backend_is_refused(exported, shared_ct, tmp_path, capsys):
    assert predict(exported, shared_ct, tmp_path / "a", backend="torch") == 1
    assert "is an export folder" in capsys.readouterr().err
    assert predict(exported / "model.ts", shared_ct, tmp_path / "b", backend="onnxruntime") == 1
    assert "runs onnx exports, but" in capsys.readouterr().err
    assert predict(exported, shared_ct, tmp_path / "c", backend="openvino") == 1
    assert "backend=openvino: choose one of auto, torch" in capsys.readouterr().err


def test_a_failed_parity_check_names_the_format_and_keeps_the_previous_export(
        exported, tiny_ckpt, tmp_path, tree_digest):
    out = tmp_path / "export"
    cfg = export_cfg(tiny_ckpt, out, "formats=[onnx]", "parity.onnx.max_abs_diff=0")
    message = (r"onnx export model.onnx fails parity: max \|logit diff\| [0-9.e-]+ \(limit 0\), "
               r"argmax agreement 1.00000")
    with pytest.raises(ParityError, match=message):
        export_run(cfg)
    assert not out.exists()
    # a re-export over a good one: the previous files and export.json stay byte-identical
    shutil.copytree(exported, out)
    before = tree_digest(out)
    with pytest.raises(ParityError, match=message):
        export_run(cfg)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_re_export_replaces_the_whole_folder_and_never_a_foreign_one(exported, tiny_ckpt,
                                                                       tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exported, out, ignore=shutil.ignore_patterns(".export_logs"))  # ts and onnx
    manifest = export_run(export_cfg(tiny_ckpt, out, "formats=[torchscript]"))
    assert list(manifest["formats"]) == ["torchscript"]
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_MANIFEST, "model.ts",
                                                     "model.ts.parity.json"]
    assert json.loads((out / EXPORT_MANIFEST).read_text())["formats"].keys() == {"torchscript"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"^{mine}: exists and is not an output of this "
                                          rf"command \(no {EXPORT_MANIFEST} in it\)"):
        export_run(export_cfg(tiny_ckpt, mine, "formats=[torchscript]"))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]


def test_export_checks_parity_on_the_given_ct(tiny_ckpt, shared_ct, tmp_path):
    model = load_model(tiny_ckpt, {}, {})
    window = sample_window(model, shared_ct)
    assert window.shape == (1, 1, 32, 32, 32) and window.std() > 0.1
    manifest = export_run(export_cfg(tiny_ckpt, tmp_path, "formats=[torchscript]",
                                     f"sample={shared_ct}"))
    assert manifest["formats"]["torchscript"]["parity"]["argmax_agreement"] == 1.0


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is available here; the GPU test covers it")
def test_tensorrt_skips_with_one_line(tiny_ckpt, shared_ct, tmp_path, capsys):
    model = load_model(tiny_ckpt, {}, {})
    manifest = export_model(model, ["trt_fp32"], tmp_path, sample_window(model))
    assert manifest["formats"] == {} and manifest["skipped"] == {"trt_fp32": trt_unavailable()}
    assert predict(tiny_ckpt, shared_ct, tmp_path / "pred", backend="tensorrt") == 1
    assert capsys.readouterr().err.strip() == f"error: backend=tensorrt: {trt_unavailable()}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs a CUDA GPU and torch-tensorrt (the trt extra)")
def test_tensorrt_exports_pass_parity_and_predict(tiny_ckpt, shared_ct, tmp_path):
    manifest = export_run(export_cfg(tiny_ckpt, tmp_path / "export",
                                     "formats=[trt_fp32,trt_fp16]"))
    assert manifest["formats"]["trt_fp32"]["parity"]["passed"]
    assert manifest["formats"]["trt_fp16"]["parity"]["passed"]
    assert predict(tiny_ckpt, shared_ct, tmp_path / "torch", device="cuda", amp=False) == 0
    assert predict(tmp_path / "export", shared_ct, tmp_path / "trt", device="cuda",
                   backend="tensorrt", amp=False) == 0
    agreement = (labels(tmp_path / "trt", shared_ct) == labels(tmp_path / "torch", shared_ct))
    assert agreement.mean() >= 0.999


def test_vista3d_automatic_mode_exports_and_predicts_the_same(vista3d_quick_run, shared_ct,
                                                              tmp_path):
    ckpt = vista3d_quick_run / "checkpoints" / "last.ckpt"
    manifest = export_run(export_cfg(ckpt, tmp_path / "export", "formats=[torchscript,onnx]"))
    assert manifest["kind"] == "vista3d" and len(manifest["known_ids"]) == 97
    assert all(entry["parity"]["passed"] for entry in manifest["formats"].values())
    for prompt in ({}, {"labels": [1, 3]}):
        assert predict(ckpt, shared_ct, tmp_path / "torch", overwrite=True, prompt=prompt) == 0
        assert predict(tmp_path / "export", shared_ct, tmp_path / "onnx", overwrite=True,
                       prompt=prompt) == 0
        ours, theirs = labels(tmp_path / "onnx", shared_ct), labels(tmp_path / "torch", shared_ct)
        assert (ours == theirs).mean() >= 0.999 and ours.any()
        names = json.loads((tmp_path / "onnx" / "ct" / "labels.json").read_text())
        assert names == json.loads((tmp_path / "torch" / "ct" / "labels.json").read_text())


def test_vista3d_export_refuses_clicks_and_unknown_ids(vista3d_quick_run, shared_ct, tmp_path,
                                                       capsys):
    ckpt = vista3d_quick_run / "checkpoints" / "last.ckpt"
    manifest = export_run(export_cfg(ckpt, tmp_path / "export", "formats=[onnx]"))
    other = min(set(vista3d_labels().everything) - set(manifest["known_ids"]))
    clicks = {"points": [[60, 50, 15]], "point_labels": [1]}
    assert predict(tmp_path / "export", shared_ct, tmp_path / "a", prompt=clicks) == 1
    assert "clicks (prompt.points) run with backend=torch only" in capsys.readouterr().err
    assert predict(tmp_path / "export", shared_ct, tmp_path / "b", prompt={"labels": [other]}) == 1
    assert f"ids [{other}] are not in this export" in capsys.readouterr().err
