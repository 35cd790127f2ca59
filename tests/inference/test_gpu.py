"""On a CUDA GPU (skipped elsewhere): predict.py's defaults (AMP, planned placement, GPU
preprocessing) against the bundle's inference.json pipeline with AMP, the placement planned from
the device's real free memory (sw.batch_size=auto within it on a whole-body-sized CT; the
full-volume accumulator it chooses giving the labels of rolling slabs), TensorRT engines checked
against sw.batch_size before any window, and TensorRT fp16 parity, of SegResNet and of VISTA3D's
automatic mode."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import save_checkpoint

from ctseg.data.phantoms import render_subject
from ctseg.errors import ConfigError
from ctseg.export.exporter import export_model, sample_window
from ctseg.export.formats import trt_unavailable
from ctseg.inference.inputs import Case
from ctseg.inference.pipeline import CasePredictor, PredictOptions
from ctseg.inference.placement import (
    MAX_AUTO_BATCH,
    MEMORY_FRACTION,
    forward_bytes,
    free_memory,
    plan_placement,
)
from ctseg.inference.runner import run
from ctseg.models.loading import EXPORT_MANIFEST, load_export, load_model
from ctseg.models.vista3d import VISTA3DModule
from ctseg.reference import wholebody_bundle as bundle
from ctseg.sliding_window import sliding_window_predict

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
# The whole-body CT at 1.5 mm (a 512x512x397 scan resampled).
WHOLE_BODY = (273, 273, 397)
needs_trt = pytest.mark.skipif(trt_unavailable() is not None, reason=str(trt_unavailable()))
# A small VISTA3D (vista3d_small's 16 channels and 4 levels) for four organs, 32^3 windows at
# 6 mm: few classes keep the random weights' near-ties rare enough for fp16 (CPU float16
# autocast measured 99.75 % of a window's argmax equal to float32's, largest difference 0.04).
VISTA3D_CLASSES = ["background", "spleen", "kidney_right", "kidney_left", "liver"]
VISTA3D_DATA = {"spacing": 6.0, "intensity": "hu_window", "smooth_sigma": 0.0,
                "patch_size": [32, 32, 32]}


@pytest.fixture(scope="module")
def trt_export(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to TensorRT fp32 and fp16 engines of 1..2 windows."""
    model = load_model(tiny_ckpt, {}, {})
    folder = tmp_path_factory.mktemp("trt") / "export"
    export_model(model, ["trt_fp32", "trt_fp16"], folder, sample_window(model), max_batch=2)
    return folder


@pytest.fixture(scope="module")
def vista3d_trt_export(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> tuple[Path, Path]:
    """A random-weight small VISTA3D checkpoint and its automatic mode exported to a TensorRT
    fp16 engine of 1..2 windows (parity checked on the shared CT's centre window)."""
    torch.manual_seed(0)
    module = VISTA3DModule(len(VISTA3D_CLASSES), VISTA3D_CLASSES, encoder_embed_dim=16,
                           blocks_down=(1, 1, 1, 1), roi_size=tuple(VISTA3D_DATA["patch_size"]))
    tmp = tmp_path_factory.mktemp("vista3d_trt")
    ckpt = save_checkpoint(module, tmp / "vista3d.ckpt", VISTA3D_DATA)
    model = load_model(ckpt, {}, {})
    export_model(model, ["trt_fp16"], tmp / "export", sample_window(model, shared_ct),
                 max_batch=2)
    return ckpt, tmp / "export"


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


def test_auto_batch_plan_on_the_device_stays_within_its_free_memory(bundle_weights, tmp_path):
    """sw.batch_size=auto with the 105-class bundle network on a whole-body-sized phantom CT at
    1.5 mm: the plan measured on the device keeps its accumulator and windows within
    MEMORY_FRACTION of the free memory, and the prediction's peak stays within that memory."""
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    hu, _ = render_subject(WHOLE_BODY, affine, np.random.default_rng(0))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), path)
    model = load_model(bundle_weights, {"num_classes": 105}, {"version": "v1", "spacing": 1.5})
    with CasePredictor(model, PredictOptions(device="cuda", sw_batch_size="auto")) as predictor:
        assert predictor.planned
        plan = predictor.placement(WHOLE_BODY)
        assert 1 <= plan.batch_size <= MAX_AUTO_BATCH
        on_device = plan.accumulator_bytes if plan.device == CUDA else 0
        assert on_device + plan.batch_size * plan.window_bytes <= MEMORY_FRACTION * plan.free_bytes
        assert plan.free_bytes <= torch.cuda.mem_get_info(CUDA)[1]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(CUDA)
        torch.cuda.reset_peak_memory_stats(CUDA)
        seg = predictor.segment(Case("ct", path, "nifti"))
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated(CUDA) - before <= plan.free_bytes
    assert seg.labels.shape == WHOLE_BODY and len(np.unique(seg.labels)) > 1


@pytest.mark.parametrize("axis", [0, 2])
def test_full_volume_plan_on_the_device_gives_the_labels_of_rolling_slabs(tiny_ckpt, axis):
    """The planner, fed the device's free memory and the measured forward pass of the tiny
    network, chooses the full-volume accumulator on the GPU for a small volume; its labels are
    those of one window's extent of rolling slabs, to the voxel."""
    model = load_model(tiny_ckpt, {}, {})
    net = model.net.to(CUDA).eval()
    torch.manual_seed(0)
    image = torch.randn(1, 1, 70, 61, 45, device=CUDA)
    window = torch.zeros(1, 1, *model.roi_size, device=CUDA)
    plan = plan_placement(free_memory(CUDA), image.shape[2:], model.num_classes, model.roi_size,
                          torch.float32, forward_bytes(net, window, CUDA), "auto", CUDA,
                          slab_axis=axis)
    assert plan.full_volume and plan.device == CUDA
    assert plan.slab_planes == image.shape[2 + axis]
    common = dict(slab_axis=axis, sw_device=CUDA, device=CUDA, output_device="cpu")
    with torch.no_grad():
        slabs = sliding_window_predict(image, net, model.roi_size, 0.25, **common)
        full = sliding_window_predict(image, net, model.roi_size, 0.25,
                                      slab_planes=plan.slab_planes, **common)
    assert torch.equal(full.labels, slabs.labels)
    assert len(torch.unique(full.labels)) > 1
    assert full.accumulator_shape[1] == image.shape[2 + axis]
    assert full.accumulator_bytes > slabs.accumulator_bytes


@needs_trt
def test_vista3d_automatic_mode_tensorrt_fp16_parity_batch_limit_and_labels(vista3d_trt_export,
                                                                            shared_ct):
    """The automatic-mode engine passes fp16 parity over the checkpoint's known ids, refuses
    more windows per pass than it was built for before any window runs, and predicts the shared
    CT with the labels of the torch network in float32 (>= 98 %: fp16 rounding of near-ties)."""
    ckpt, folder = vista3d_trt_export
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    model = load_model(ckpt, {}, {})
    assert manifest["kind"] == "vista3d" and manifest["known_ids"] == list(model.known_ids)
    entry = manifest["formats"]["trt_fp16"]
    assert entry["max_batch"] == 2 and entry["parity"]["passed"], entry
    assert entry["parity"]["window"] == [1, 1, *VISTA3D_DATA["patch_size"]]
    exported = load_export(folder)
    with pytest.raises(ConfigError, match=r"model_trt_fp16.ts: .*at most 2 window"):
        CasePredictor(exported, PredictOptions(device="cuda", backend="tensorrt",
                                               sw_batch_size=4))
    case = Case("ct", shared_ct, "nifti")
    with CasePredictor(exported, PredictOptions(device="cuda", backend="tensorrt",
                                                sw_batch_size="auto")) as predictor:
        assert predictor.batch_cap == 2 and predictor.format == "trt_fp16"
        ours = predictor.segment(case).labels
    with CasePredictor(model, PredictOptions(device="cuda", backend="torch", amp=False)) as p:
        theirs = p.segment(case).labels
    assert ours.shape == theirs.shape
    assert (ours == theirs).mean() >= 0.98
    assert len(np.unique(theirs)) > 1
