"""Running an exported file: each format loaded as a callable from a (B, C, *roi) window batch
to (B, K, *roi) float32 logits on the batch's device, with one clear error for a bad file."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from ctseg.errors import CtsegError, MissingFileError
from ctseg.export.formats import TRT_FORMATS

Runner = Callable[[Tensor], Tensor]


class ExportFileError(CtsegError, ValueError):
    """An exported model file that cannot be loaded or run."""


def _unreadable(path: Path, fmt: str, err: Exception) -> ExportFileError:
    """The error for a file that does not load as `fmt`, naming it and how to fix it."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ExportFileError(f"{path}: not a readable {fmt} export ({detail[:200]}); the file is "
                           "damaged or of another format: export it again with "
                           "python -m ctseg.export ckpt=<.ckpt> output=<dir>")


def _torchscript(path: Path, fmt: str, device: torch.device) -> Runner:
    """A TorchScript (or torch-tensorrt TorchScript) module as a runner."""
    if fmt in TRT_FORMATS and importlib.util.find_spec("torch_tensorrt") is not None:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT ops TorchScript needs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as err:
        raise _unreadable(path, fmt, err) from err

    def run(windows: Tensor) -> Tensor:
        with torch.no_grad():
            return module(windows.to(device)).float()

    return run


def _onnxruntime(path: Path, device: torch.device) -> Runner:
    """An ONNX file in onnxruntime (CUDA provider on a GPU when onnxruntime has it)."""
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise _unreadable(path, "onnx", err) from err
    name = session.get_inputs()[0].name

    def run(windows: Tensor) -> Tensor:
        array = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: array})[0]).to(windows.device)

    return run


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_runner(path: str | Path, fmt: str, device: torch.device | str, sha256: str) -> Runner:
    """The exported `path` (format `fmt`) as a window runner on `device`, once its bytes match
    `sha256` (the digest export.json records: TorchScript and ONNX files are code, loaded only
    as exported)."""
    path, device = Path(path), torch.device(device)
    if not path.is_file():
        raise MissingFileError(f"{path}: no {fmt} export there; export it with python -m "
                               "ctseg.export ckpt=<.ckpt> formats=[" + fmt + "] output=<dir>")
    if sha256_of(path) != sha256:
        raise ExportFileError(f"{path}: its SHA-256 differs from the one export.json records, so "
                              "the file changed after export (damaged, or replaced); export it "
                              "again with python -m ctseg.export ckpt=<.ckpt> output=<dir>")
    if fmt == "onnx":
        return _onnxruntime(path, device)
    return _torchscript(path, fmt, device)
