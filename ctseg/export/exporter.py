"""Export a loaded model (checkpoint or bundle weights) to several formats in one folder: each
file checked for parity on one window, and `export.json` describing what prediction needs
(classes, preprocessing, window size, formats)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from ctseg.atomic import scratch_folder, swapped_folder
from ctseg.data.phantoms import render_subject
from ctseg.data.transforms import IMAGE, infer_transforms
from ctseg.export import parity
from ctseg.export.formats import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPSET,
    FILES,
    TRT_FORMATS,
    check_formats,
    trt_unavailable,
    write_format,
)
from ctseg.export.runtime import load_runner, sha256_of
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.loading import EXPORT_MANIFEST, window_network
from ctseg.sliding_window import pad_to_roi

log = logging.getLogger(__name__)


def centre_window(volume: Tensor, roi: Sequence[int]) -> Tensor:
    """The (1, C, *roi) window at the centre of a (1, C, D, H, W) volume (padded like the
    sliding window when smaller)."""
    padded, _ = pad_to_roi(volume, tuple(roi), 0.0, "replicate")
    starts = [(int(s) - r) // 2 for s, r in zip(padded.shape[2:], roi, strict=True)]
    return padded[(slice(None), slice(None),
                   *(slice(a, a + r) for a, r in zip(starts, roi, strict=True)))].contiguous()


def sample_window(model: LoadedModel, sample: str | Path | None = None) -> Tensor:
    """A preprocessed (1, 1, *roi) window for the parity check: the centre of CT `sample`, or
    of a synthetic phantom CT at the model's spacing when None."""
    transforms = infer_transforms(model.pipeline)
    with scratch_folder("export_sample") as tmp:
        if sample is None:
            spacing = np.asarray(model.pipeline.spacing, dtype=np.float64)
            shape = tuple(int(r) for r in model.roi_size)
            affine = np.diag([*spacing, 1.0])
            hu, _ = render_subject(shape, affine, np.random.default_rng(0))
            sample = tmp / "phantom.nii.gz"
            nib.save(nib.Nifti1Image(hu, affine), sample)
        volume = transforms({IMAGE: str(sample)})[IMAGE][None].as_tensor()
    return centre_window(volume.float(), model.roi_size)


def manifest_entry(model: LoadedModel, source: str, opset: int) -> dict[str, Any]:
    """What prediction reads from an export folder: model kind, classes, preprocessing, window."""
    return {"source": source, "kind": model.kind, "label_names": list(model.label_names),
            "known_ids": list(model.known_ids), "pipeline": asdict(model.pipeline),
            "roi_size": list(model.roi_size), "opset": opset, "formats": {}}


def export_model(model: LoadedModel, formats: Sequence[str], output: str | Path,
                 window: Tensor, source: str = "", opset: int = DEFAULT_OPSET,
                 thresholds: Mapping[str, Any] | None = None, device: str = "cpu",
                 max_batch: int = DEFAULT_MAX_BATCH, keep: Sequence[str] = ()
                 ) -> dict[str, Any]:
    """Write `model` in each of `formats` to `output`, check each on `window`, then write
    `export.json` with each file's SHA-256; TensorRT formats are skipped with one logged line
    where they cannot run. The files, their parity reports and `export.json` are written and
    checked in a private folder that replaces `output` as a whole only once every check passed
    (`swapped_folder`): a ParityError (naming format and figures) or a kill leaves a previous
    export in `output` as it was, and no file of it stays beside a new one; the entries `keep`
    of `output` (the CLI's log folder) are kept."""
    if model.net is None:
        raise ValueError("export_model needs a model with its torch network")
    output = Path(output)
    net = window_network(model.net, model.kind, model.known_ids).cpu()
    window = window.float().cpu()
    manifest = manifest_entry(model, source, opset)
    skipped = {}
    references: dict[torch.device, Tensor] = {}  # the torch logits, once per device
    with swapped_folder(output, own=EXPORT_MANIFEST, keep=keep) as staging:
        for fmt in check_formats(list(formats)):
            if fmt in TRT_FORMATS and (reason := trt_unavailable()):
                log.warning("%s skipped: %s", fmt, reason)
                skipped[fmt] = reason
                continue
            run_device = torch.device("cuda" if fmt in TRT_FORMATS else device)
            path = write_format(net, fmt, staging / FILES[fmt], window, opset, max_batch)
            if run_device not in references:
                references[run_device] = parity.reference_logits(net.to(run_device),
                                                                 window.to(run_device))
                net.cpu()
            digest = sha256_of(path)
            runner = load_runner(path, fmt, run_device, digest)
            report = parity.check(fmt, path, references[run_device], runner,
                                  window.to(run_device), parity.thresholds_for(fmt, thresholds))
            manifest["formats"][fmt] = {"file": path.name, "sha256": digest, "parity": report}
            if fmt in TRT_FORMATS:  # the engine's optimisation profile: 1..max_batch windows
                manifest["formats"][fmt]["max_batch"] = max_batch
        if skipped:
            manifest["skipped"] = skipped
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s to %s", ", ".join(manifest["formats"]) or "nothing", output)
    return manifest
