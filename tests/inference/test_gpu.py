"""On a CUDA GPU (skipped elsewhere): predict.py's defaults (AMP, planned placement, GPU
preprocessing) against the bundle's inference.json pipeline with AMP, TensorRT engines checked
against sw.batch_size before any window, and TensorRT fp16 parity."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctseg.errors import ConfigError
from ctseg.export.exporter import export_model, sample_window
from ctseg.export.formats import trt_unavailable
from ctseg.inference.pipeline import CasePredictor, PredictOptions
from ctseg.inference.runner import run
from ctseg.models.loading import EXPORT_MANIFEST, load_export, load_model
from ctseg.reference import wholebody_bundle as bundle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(trt_unavailable() is not None, reason=str(trt_unavailable()))


@pytest.fixture(scope="module")
def trt_export(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to TensorRT fp32 and fp16 engines of 1..2 windows."""
    model = load_model(tiny_ckpt, {}, {})
    folder = tmp_path_factory.mktemp("trt") / "export"
    export_model(model, ["trt_fp32", "trt_fp16"], folder, sample_window(model), max_batch=2)
    return folder


@pytest.mark.parametrize("batch", ["1", "auto"])
def test_predict_defaults_agree_with_the_bundle_pipeline_with_amp(bundle_weights, shared_ct,
                                                                  tmp_path, batch):
    state = torch.load(bundle_weights, weights_only=True)
    reference = bundle.predict(str(shared_ct), state, bundle.PIXDIM["lowres"], device="cuda")
    cfg = {"ckpt": str(bundle_weights), "input": str(shared_ct), "output": str(tmp_path),
           "device": "cuda", "masks": False, "progress": False, "sw": {"batch_size": batch},
           "data": {"version": "v1", "spacing": 3.0}, "model": {"num_classes": 105}}
    assert run(cfg) == 0
    ours = np.asarray(nib.load(tmp_path / "ct" / "labels.nii.gz").dataobj)
    assert ours.shape == reference.shape
    assert (ours == reference).mean() >= 0.999
    timing = json.loads((tmp_path / "timing.json").read_text())["cases"][0]
    assert timing["peak_gpu_mb"] > 0


def test_gpu_preprocessing_gives_the_labels_of_cpu_preprocessing(tiny_ckpt, shared_ct):
    from ctseg.inference.inputs import Case

    model = load_model(tiny_ckpt, {}, {})
    labels = []
    for gpu in (True, False):
        with CasePredictor(model, PredictOptions(device="cuda", gpu_preprocessing=gpu)) as p:
            assert p.preprocess_device.type == ("cuda" if gpu else "cpu")
            labels.append(p.segment(Case("ct", shared_ct, "nifti")).labels)
    assert (labels[0] == labels[1]).mean() >= 0.999


@needs_trt
def test_tensorrt_engine_refuses_a_larger_sw_batch_size_up_front(trt_export):
    manifest = json.loads((trt_export / EXPORT_MANIFEST).read_text())
    assert manifest["formats"]["trt_fp16"]["max_batch"] == 2
    model = load_export(trt_export)
    with pytest.raises(ConfigError, match=r"model_trt_fp16.ts: .*at most 2 window"):
        CasePredictor(model, PredictOptions(device="cuda", backend="tensorrt", sw_batch_size=4))
    with CasePredictor(model, PredictOptions(device="cuda", backend="tensorrt",
                                             sw_batch_size="auto")) as predictor:
        assert predictor.batch_cap == 2


@needs_trt
def test_tensorrt_fp16_parity(trt_export):
    manifest = json.loads((trt_export / EXPORT_MANIFEST).read_text())
    for fmt in ("trt_fp32", "trt_fp16"):
        parity = manifest["formats"][fmt]["parity"]
        assert parity["passed"], (fmt, parity)
