"""The export formats: file names and how a network (one sliding window in, logits out:
`ctseg.models.loading.window_network`) is written in each of them."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ctseg.atomic import write_atomic
from ctseg.errors import ConfigError

log = logging.getLogger(__name__)

# Format -> file written in the export folder.
FILES = {
    "torchscript": "model.ts",
    "onnx": "model.onnx",
    "trt_fp32": "model_trt_fp32.ts",
    "trt_fp16": "model_trt_fp16.ts",
}
FORMATS = tuple(FILES)
TRT_FORMATS = ("trt_fp32", "trt_fp16")
# Defaults of an export (conf/export_settings/default.yaml holds the same values; tested).
DEFAULT_FORMATS = ("torchscript", "onnx")
DEFAULT_OPSET = 17
DEFAULT_MAX_BATCH = 4
INPUT, OUTPUT = "image", "logits"
# Batch and spatial axes stay free in ONNX, so any window size and sw_batch_size run.
DYNAMIC_AXES = {name: {0: "batch", 2: "depth", 3: "height", 4: "width"}
                for name in (INPUT, OUTPUT)}


def check_formats(formats: list[str]) -> list[str]:
    """`formats` validated against FORMATS, duplicates removed, order kept."""
    unknown = [f for f in formats if f not in FILES]
    if unknown or not formats:
        raise ConfigError(f"formats={formats}: choose one or more of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def trt_unavailable() -> str | None:
    """Why TensorRT export cannot run here (one line), or None when it can."""
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is available"
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "TensorRT needs torch-tensorrt, which is not installed (pip install -e '.[trt]')"
    return None


@contextmanager
def _tracing() -> Iterator[None]:
    """No gradients, and none of the tracer's warnings: shape checks turned into constants (the
    exports keep free shapes, and every export is parity-checked), TorchScript's deprecation in
    favour of torch.export (TensorRT, Triton and libtorch load TorchScript today), and GroupNorm
    exported through InstanceNormalization flagged as training mode."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train")
        yield


def _torchscript(net: nn.Module, example: Tensor, path: Path) -> None:
    """Trace `net` on `example` and save it."""
    with _tracing():
        torch.jit.save(torch.jit.trace(net, example), str(path))


def _onnx(net: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """Export `net` to ONNX with free batch and spatial axes."""
    with _tracing():
        torch.onnx.export(net, (example,), str(path), opset_version=opset, dynamo=False,
                          input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=DYNAMIC_AXES)


def _tensorrt(net: nn.Module, example: Tensor, path: Path, fp16: bool, max_batch: int) -> None:
    """Compile `net` with torch-tensorrt for windows of `example`'s size (batch 1..max_batch)
    and save it as TorchScript (loadable with torch.jit.load once torch_tensorrt is imported)."""
    import torch_tensorrt

    device = torch.device("cuda")
    net = net.to(device).eval()
    example = example.to(device)
    roi = tuple(example.shape[1:])
    inputs = [torch_tensorrt.Input(min_shape=(1, *roi), opt_shape=(max_batch, *roi),
                                   max_shape=(max_batch, *roi), dtype=torch.float32)]
    precisions = {torch.float16, torch.float32} if fp16 else {torch.float32}
    compiled = torch_tensorrt.compile(net, ir="dynamo", inputs=inputs,
                                      enabled_precisions=precisions)
    torch_tensorrt.save(compiled, str(path), output_format="torchscript", inputs=[example])


def write_format(net: nn.Module, fmt: str, path: Path, example: Tensor,
                 opset: int = DEFAULT_OPSET, max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """Write `net` (traced on `example`, one window) as `fmt` to `path`, atomically."""
    if fmt == "torchscript":
        return write_atomic(path, lambda tmp: _torchscript(net, example, tmp))
    if fmt == "onnx":
        return write_atomic(path, lambda tmp: _onnx(net, example, tmp, opset))
    if fmt in TRT_FORMATS:
        return write_atomic(path, lambda tmp: _tensorrt(net, example, tmp, fmt == "trt_fp16",
                                                        max_batch))
    raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
