"""What wrote a case folder of predict.py: the SHA-256 of every model (ensemble member) and the
settings that change what the folder holds, recorded in it as `prediction.json`, so that a rerun
skips only the cases that the same model and settings wrote."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctseg.errors import ConfigError
from ctseg.export.runtime import sha256_of
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.loading import EXPORT_MANIFEST

RECORD_FILE = "prediction.json"
# The settings of a prediction run that change a case folder's content (its labels or its
# files), by PredictOptions field, with the predict.yaml key that sets each. The others (device,
# sw.batch_size, sw.slab_axis, channels_last, gpu_preprocessing, overlap_io, ...) change speed
# or memory only. The preprocessing (data.*) and the classes are recorded from the loaded model.
RECORDED_OPTIONS = {
    "roi_size": "sw.roi_size", "overlap": "sw.overlap", "mode": "sw.mode",
    "padding_mode": "sw.padding_mode", "accum_dtype": "sw.accum_dtype",
    "skip_air": "sw.skip_air", "amp": "amp", "cpu_bf16": "cpu_bf16", "backend": "backend",
    "tta": "tta", "tta_axes": "tta_axes", "prompt": "prompt",
    "largest_component": "postprocessing", "series_uid": "series_uid", "masks": "masks",
    "probabilities": "probabilities", "dicom_seg": "dicom_seg",
}


def model_digest(source: str | Path) -> str:
    """The SHA-256 of a model source: a checkpoint or state-dict file, an export file, or an
    export folder's export.json (which holds the SHA-256 of each of its files)."""
    path = Path(source)
    return sha256_of(path / EXPORT_MANIFEST if path.is_dir() else path)


def prediction_record(sources: Sequence[str], models: Sequence[LoadedModel],
                      options: Any) -> dict[str, Any]:
    """The record of a run predicting with `models` (loaded from `sources`) and PredictOptions
    `options`, as its JSON text reads back."""
    first = models[0]
    record = {
        "models": [{"source": str(s), "sha256": model_digest(s)} for s in sources],
        "classes": list(first.label_names), "known_ids": list(first.known_ids),
        "data": dataclasses.asdict(first.pipeline), "window": list(first.roi_size),
        "options": {key: getattr(options, field) for field, key in RECORDED_OPTIONS.items()},
    }
    return json.loads(json.dumps(record, default=_plain))


def _plain(value: Any) -> Any:
    """A dataclass (the prompt) as a dict, a numpy number as a Python one, for JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_record(folder: Path, record: Mapping[str, Any]) -> None:
    """Write `record` into the (temporary) case folder `folder`."""
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def difference(folder: Path, record: Mapping[str, Any]) -> str | None:
    """How the case folder `folder` differs from what `record` would write (None: it does not)."""
    path = folder / RECORD_FILE
    if not path.is_file():
        return (f"it was written before ctseg recorded the model and settings of a case (no "
                f"{RECORD_FILE}), so it may come from another model or settings")
    try:
        old = json.loads(path.read_text())
        old_digests = [m["sha256"] for m in old["models"]]
    except (ValueError, KeyError, TypeError):
        return f"its {RECORD_FILE} is not a record of ctseg's"
    digests = [m["sha256"] for m in record["models"]]
    if old_digests != digests:
        sources = ",".join(m["source"] for m in record["models"])
        return (f"it was written by another model (the SHA-256 of ckpt={sources} differs from "
                f"the recorded one{'s' if len(old_digests) > 1 else ''})")
    for key in ("classes", "known_ids", "window"):
        if old.get(key) != record[key]:
            return f"it was written for other model {key.replace('_', ' ')}"
    for group in ("data", "options"):
        for key, value in record[group].items():
            before = (old.get(group) or {}).get(key)
            if before != value:
                name = f"data.{key}" if group == "data" else key
                return f"it was written with {name}={_text(before)} (this run: {_text(value)})"
    return None


def _text(value: Any) -> str:
    """A recorded value as a command line would give it."""
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value


def check_done(output: Path, names: Sequence[str], record: Mapping[str, Any]) -> list[str]:
    """The cases among `names` whose folder in `output` the same model and settings wrote (to be
    skipped); a ConfigError naming the first case folder written otherwise, and the fix."""
    done, other = [], []
    for name in names:
        if (output / name).is_dir():
            why = difference(output / name, record)
            if why is None:
                done.append(name)
            else:
                other.append((output / name, why))
    if other:
        folder, why = other[0]
        more = f" ({len(other) - 1} more case folders differ too)" if len(other) > 1 else ""
        raise ConfigError(f"{folder}: exists and is not skipped: {why}{more}; set overwrite=true "
                          "to predict it again, or choose another output folder")
    return done
