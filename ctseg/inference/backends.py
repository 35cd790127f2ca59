"""Where the window logits of a prediction come from: the torch network, or one of its exports
(TorchScript, ONNX Runtime, TensorRT) read from an export folder or written on the fly."""

from __future__ import annotations

import logging
from contextlib import ExitStack

import torch
from torch import Tensor

from ctseg.atomic import scratch_folder
from ctseg.errors import ConfigError
from ctseg.export.exporter import export_model, sample_window
from ctseg.export.formats import DEFAULT_MAX_BATCH, trt_unavailable
from ctseg.export.runtime import Runner, load_runner
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.loading import load_export

log = logging.getLogger(__name__)

# Backend -> export formats it runs, in order of preference.
BACKEND_FORMATS = {
    "torchscript": ("torchscript",),
    "onnxruntime": ("onnx",),
    "tensorrt": ("trt_fp16", "trt_fp32"),
}
BACKENDS = ("torch", *BACKEND_FORMATS)
AUTO = "auto"


def choose_backend(backend: str | None, model: LoadedModel, device: torch.device) -> str:
    """`backend` checked against BACKENDS; auto (or None): torch for a checkpoint, for an export
    folder the first of tensorrt (on CUDA), onnxruntime, torchscript that it holds."""
    if backend in (None, AUTO):
        if model.net is not None:
            return "torch"
        order = ("onnxruntime", "torchscript")
        if device.type == "cuda":
            order = ("tensorrt", *order)
        for name in order:
            if set(BACKEND_FORMATS[name]) & set(model.formats):
                return name
        raise ConfigError(f"{model.export_dir} holds no export a backend runs here "
                          f"({', '.join(model.formats) or 'none'}); export onnx or torchscript")
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend}: choose one of auto, {', '.join(BACKENDS)}")
    if backend == "tensorrt" and (reason := trt_unavailable()):
        raise ConfigError(f"backend=tensorrt: {reason}")
    return backend


def torch_runner(net: torch.nn.Module, device: torch.device, channels_last: bool) -> Runner:
    """The torch network on `device` as a runner; `channels_last` runs its convolutions on
    channels-last (NDHWC) tensors, which oneDNN computes faster on CPU."""
    net = net.to(device).eval()
    if not channels_last:
        return net
    net = net.to(memory_format=torch.channels_last_3d)

    def run(windows: Tensor) -> Tensor:
        return net(windows.contiguous(memory_format=torch.channels_last_3d)).contiguous()

    return run


def _format_for(model: LoadedModel, backend: str, amp: bool) -> str:
    """The export format `backend` runs: TensorRT fp16 with AMP, fp32 without (either when only
    one exists)."""
    formats = BACKEND_FORMATS[backend]
    if backend == "tensorrt" and not amp:
        formats = tuple(reversed(formats))
    available = [f for f in formats if f in model.formats]
    if model.export_dir is not None:
        if not available:
            raise ConfigError(f"backend={backend} runs {' or '.join(formats)} exports, but "
                              f"{model.export_dir} holds {', '.join(model.formats) or 'none'}; "
                              f"export it with python -m ctseg.export formats=[{formats[0]}]")
        return available[0]
    return formats[0]


def _export_now(model: LoadedModel, fmt: str, stack: ExitStack, batch_size: int | str
                ) -> LoadedModel:
    """Export `model` to `fmt` in a temporary folder kept for the run (parity checked on a
    phantom window; TensorRT engines take `batch_size` windows, at least the default max_batch);
    that export, loaded."""
    folder = stack.enter_context(scratch_folder("backend_export"))
    log.info("exporting the network to %s for this run", fmt)
    max_batch = max(DEFAULT_MAX_BATCH, batch_size if isinstance(batch_size, int) else 0)
    export_model(model, [fmt], folder, sample_window(model), max_batch=max_batch)
    return load_export(folder)


def check_batch(model: LoadedModel, fmt: str, batch_size: int | str) -> int | None:
    """The most windows per forward pass the `fmt` file of `model` accepts (None: any); a
    ConfigError naming the file, before any window runs, when `batch_size` exceeds it."""
    limit = model.batch_limits.get(fmt)
    if limit is None or not isinstance(batch_size, int) or batch_size <= limit:
        return limit
    path = model.export_dir / model.formats[fmt] if model.export_dir else fmt
    raise ConfigError(f"{path}: this TensorRT engine runs at most {limit} window(s) per pass, "
                      f"sw.batch_size={batch_size} asks for more; set sw.batch_size={limit} (or "
                      f"auto), or export again with python -m ctseg.export "
                      f"formats=[{fmt}] max_batch={batch_size}")


def open_runner(model: LoadedModel, backend: str | None, device: torch.device, amp: bool,
                channels_last: bool, stack: ExitStack, batch_size: int | str = 1
                ) -> tuple[Runner, str, int | None]:
    """The window runner of `backend` for `model`, the format it runs ("torch" for the network
    itself) and the most windows per pass it accepts (None: any; `check_batch` refuses a larger
    `batch_size`); temporary exports live as long as `stack`."""
    backend = choose_backend(backend, model, device)
    if backend == "torch":
        if model.net is None:
            raise ConfigError(f"{model.export_dir} is an export folder: choose the backend of "
                              f"one of its formats ({', '.join(model.formats)}), e.g. "
                              "backend=onnxruntime, or give the checkpoint for backend=torch")
        return torch_runner(model.net, device, channels_last), "torch", None
    fmt = _format_for(model, backend, amp)
    if model.export_dir is None:
        model = _export_now(model, fmt, stack, batch_size)
    limit = check_batch(model, fmt, batch_size)
    return load_runner(model.export_dir / model.formats[fmt], fmt, device,
                       model.digests[fmt]), fmt, limit
