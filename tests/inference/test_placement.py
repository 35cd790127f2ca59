"""GPU placement planned from fake free-memory figures, the full-volume accumulator against the
rolling slabs on CPU, and TensorRT batch limits checked up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctseg.errors import ConfigError
from ctseg.export.exporter import manifest_entry
from ctseg.inference.backends import check_batch
from ctseg.inference.pipeline import PredictOptions
from ctseg.inference.placement import (
    MAX_AUTO_BATCH,
    MEMORY_FRACTION,
    accumulator_bytes,
    fixed_placement,
    plan_placement,
    window_cost,
)
from ctseg.models.loading import EXPORT_MANIFEST, load_export, load_model
from ctseg.sliding_window import sliding_window_predict

GIB = 2**30
CUDA = torch.device("cuda")
# The whole-body CT at 1.5 mm, 105 classes, 96^3 windows of ~0.5 GiB forward pass each.
SIZE, CLASSES, ROI, FORWARD = (273, 273, 397), 105, (96, 96, 96), GIB // 2


def plan(free_gib: float, batch: int | str = "auto", **kwargs):
    """The plan for the whole-body CT with `free_gib` GiB free."""
    return plan_placement(int(free_gib * GIB), SIZE, CLASSES, ROI, torch.float32, FORWARD,
                          batch, CUDA, **kwargs)


def test_full_volume_when_it_fits_with_margin():
    full = accumulator_bytes(SIZE, CLASSES, SIZE[2], 2, torch.float32)
    window = window_cost(FORWARD, CLASSES, ROI)
    free = (full + window) / MEMORY_FRACTION / GIB
    p = plan(free + 0.01)
    assert p.full_volume and p.device == CUDA and p.slab_planes == SIZE[2]
    assert p.batch_size == 1 and p.accumulator_bytes == full
    assert "full-volume accumulator on cuda" in p.describe()
    # just below the margin: rolling slabs on the GPU, one window's extent deep
    p = plan(free - 0.01)
    assert not p.full_volume and p.device == CUDA and p.slab_planes is None
    assert p.accumulator_bytes < full


def test_slabs_in_host_memory_when_only_windows_fit():
    p = plan(2.0)
    assert not p.full_volume and p.device == torch.device("cpu") and p.batch_size == 1


def test_auto_batch_grows_with_free_memory_and_is_capped():
    sizes = [plan(free).batch_size for free in (20, 22, 24, 200)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == MAX_AUTO_BATCH
    assert plan(200, max_batch=2).batch_size == 2  # a TensorRT engine's limit
    assert plan(200, batch=3).batch_size == 3  # a number is kept


def test_float16_accumulator_halves_what_full_volume_needs():
    half = accumulator_bytes(SIZE, CLASSES, SIZE[2], 2, torch.float16)
    assert half < 0.6 * accumulator_bytes(SIZE, CLASSES, SIZE[2], 2, torch.float32)
    p = plan_placement(int(12 * GIB), SIZE, CLASSES, ROI, torch.float16, FORWARD, "auto", CUDA)
    assert p.full_volume


def test_clear_error_when_not_even_one_window_fits():
    with pytest.raises(ConfigError, match=r"one window of \(96, 96, 96\) need.*device=cpu"):
        plan(0.5)
    with pytest.raises(ConfigError, match=r"sw.batch_size=8 windows.*sw.batch_size=auto"):
        plan(3.0, batch=8)


def test_cpu_and_vista3d_keep_todays_placement():
    p = fixed_placement(torch.device("cpu"), "auto")
    assert (p.full_volume, p.slab_planes, p.batch_size) == (False, None, 1)
    assert fixed_placement(torch.device("cpu"), 4).batch_size == 4


def test_batch_size_option_takes_auto_or_a_whole_number():
    assert PredictOptions(sw_batch_size="auto").sw_batch_size == "auto"
    for bad in (0, "four", 1.5, True):
        with pytest.raises(ConfigError, match=r"sw\.batch_size"):
            PredictOptions(sw_batch_size=bad)


@pytest.mark.parametrize("axis", [0, 2])
def test_full_volume_plan_gives_the_labels_of_rolling_slabs(axis: int):
    torch.manual_seed(0)
    image = torch.randn(1, 1, 45, 38, 52)
    conv = torch.nn.Conv3d(1, 5, 3, padding=1)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return conv(batch)

    roi = (16, 16, 16)
    p = plan_placement(GIB, image.shape[2:], 5, roi, torch.float32, 2**20, "auto",
                       torch.device("cpu"), slab_axis=axis)
    assert p.full_volume and p.slab_planes == image.shape[2 + axis]
    common = dict(slab_axis=axis, keep_channels=[1, 3])
    slabs = sliding_window_predict(image, predictor, roi, 0.25, **common)
    full = sliding_window_predict(image, predictor, roi, 0.25, sw_batch_size=p.batch_size,
                                  slab_planes=p.slab_planes, **common)
    assert torch.equal(full.labels, slabs.labels)
    for c in (1, 3):
        torch.testing.assert_close(full.probabilities[c], slabs.probabilities[c])
    assert full.accumulator_shape[1] == image.shape[2 + axis]
    assert full.accumulator_bytes > slabs.accumulator_bytes


def test_tensorrt_batch_limit_is_recorded_and_checked_up_front(tiny_ckpt: Path,
                                                               tmp_path: Path):
    model = load_model(tiny_ckpt, {}, {})
    manifest = manifest_entry(model, str(tiny_ckpt), 17)
    manifest["formats"]["trt_fp16"] = {"file": "model_trt_fp16.ts", "sha256": "0" * 64,
                                       "max_batch": 2}
    (tmp_path / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    exported = load_export(tmp_path)
    assert exported.batch_limits == {"trt_fp16": 2}
    assert check_batch(exported, "trt_fp16", 2) == 2
    assert check_batch(exported, "trt_fp16", "auto") == 2
    with pytest.raises(ConfigError, match=r"model_trt_fp16.ts: this TensorRT engine runs at most 2 "
                       r"window\(s\) per pass, sw.batch_size=4 .*sw.batch_size=2 .*max_batch=4"):
        check_batch(exported, "trt_fp16", 4)


def test_gpu_preprocessing_on_cpu_is_todays_preprocessing(tiny_ckpt: Path, shared_ct: Path):
    from ctseg.data.transforms import IMAGE
    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor

    model = load_model(tiny_ckpt, {}, {})
    case = Case("ct", shared_ct, "nifti")
    prepared = []
    for gpu in (True, False):
        with CasePredictor(model, PredictOptions(device="cpu", gpu_preprocessing=gpu)) as p:
            assert p.preprocess_device == torch.device("cpu") and not p.planned
            prepared.append(p.prepare(case).data[IMAGE])
    assert torch.equal(prepared[0].as_tensor(), prepared[1].as_tensor())
    assert torch.equal(prepared[0].affine, prepared[1].affine)
