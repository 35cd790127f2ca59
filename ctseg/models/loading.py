"""Build the network and the preprocessing of a prediction from a ctseg checkpoint or a bundle
state dict (`model.pt`), checking that the class count fits the configuration.

Preprocessing comes from the checkpoint (a ctseg `.ckpt`, an export folder) or the bundle's
inference.json (a bare `model.pt`); every `data.*` value set on the command line overrides it, and
a value that cannot be honoured is an error, never ignored."""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctseg.data.transforms import HU_WINDOW, PipelineConfig
from ctseg.errors import CheckpointError, ConfigError, MissingFileError
from ctseg.labels import label_names, num_classes
from ctseg.models.segresnet import SegResNetModule
from ctseg.models.vista3d import AutomaticVISTA3D, VISTA3DModule, build_vista3d
from ctseg.models.weights import (
    SEGRESNET_HEAD,
    load_into,
    network_state_dict,
    read_checkpoint,
)
from ctseg.vista3d_labels import vista3d_labels

log = logging.getLogger(__name__)

HPARAMS, DATA_HPARAMS = "hyper_parameters", "datamodule_hyper_parameters"
# Preprocessing settings that prediction takes from a checkpoint or the `data` config.
PREDICT_KEYS = ("spacing", "intensity", "hu_window", "patch_size", "smooth_sigma", "predict_steps")
# Other keys of predict.py's `data` config: the class table of a bare SegResNet state dict.
CLASS_KEYS = ("version",)
# Module arguments that make no sense at inference (weights come from the checkpoint itself).
_SKIPPED = ("pretrained", "reinit_head", "optimizer", "scheduler", "warmup_epochs",
            "warmup_multiplier")
# Keys only a VISTA3D state dict has (its class head).
VISTA3D_MARK = "class_head."
# The wholeBody_ct_segmentation bundle's inference.json preprocessing, for its bare model.pt.
WHOLEBODY_BUNDLE_DATA = {"spacing": 1.5, "intensity": "segresnet", "smooth_sigma": 0.0,
                         "patch_size": (96, 96, 96)}
# The vista3d bundle's inference.json preprocessing, for its bare models/model.pt.
VISTA3D_BUNDLE_DATA = {"spacing": 1.5, "intensity": "hu_window",
                       "hu_window": HU_WINDOW,
                       "smooth_sigma": 0.0, "patch_size": (128, 128, 128),
                       "predict_steps": "vista3d_bundle"}
# Keys of a VISTA3D state dict that give its encoder's width and depth.
VISTA3D_STEM = "image_encoder.encoder.conv_init.weight"
VISTA3D_BLOCK = re.compile(r"image_encoder\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.")


# The description of an export folder (written by ctseg.export).
EXPORT_MANIFEST = "export.json"


@dataclass(frozen=True)
class LoadedModel:
    """The network in eval mode (None for an export folder), its class names, preprocessing and
    default window size; `export_dir` holds exported files (`export.json`) when loaded from one."""

    net: nn.Module | None
    label_names: list[str]
    pipeline: PipelineConfig
    roi_size: tuple[int, int, int]
    kind: str = "segresnet"
    known_ids: list[int] = field(default_factory=list)
    export_dir: Path | None = None
    formats: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # format -> SHA-256 of its file

    @property
    def num_classes(self) -> int:
        """Number of output channels (background included)."""
        return len(self.label_names)


def head_classes(state: Mapping[str, torch.Tensor], path: Path) -> int:
    """Output classes of a SegResNet state dict (rows of its final convolution)."""
    weights = [v for k, v in state.items() if k.startswith(SEGRESNET_HEAD) and k.endswith("weight")]
    if not weights:
        raise ValueError(f"{path}: no SegResNet output layer ({SEGRESNET_HEAD}*) in the weights; "
                         "is this a SegResNet checkpoint?")
    return int(weights[0].shape[0])


def pipeline_from(data: Mapping[str, Any]) -> PipelineConfig:
    """The prediction preprocessing from datamodule hyper-parameters or the `data` config: the
    keys that shape an input volume (spacing, intensity, window, smoothing, patch size). A
    checkpoint without `smooth_sigma` (ctseg before it was recorded) gets the scheme's default,
    which is what such a checkpoint was trained with."""
    return PipelineConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                             for k, v in data.items() if k in PREDICT_KEYS and v is not None})


def data_overrides(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing values set in predict.py's `data` config (null: not set), or a
    ConfigError naming a set key that prediction has no use for."""
    unused = sorted(k for k, v in data_cfg.items()
                    if v is not None and k not in (*PREDICT_KEYS, *CLASS_KEYS))
    if unused:
        honoured = ", ".join(f"data.{k}" for k in PREDICT_KEYS)
        raise ConfigError(f"data.{unused[0]}={data_cfg[unused[0]]!r} is not a prediction setting "
                          f"and would be ignored; predict.py honours {honoured} (and "
                          "data.version for a bare SegResNet state dict)")
    return {k: v for k, v in data_cfg.items() if k in PREDICT_KEYS and v is not None}


def with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any], path: Path,
                   source: str) -> dict[str, Any]:
    """`data` (the preprocessing of `source`) with the command line's `overrides`, logged."""
    if overrides:
        log.info("%s: %s override %s", path, ", ".join(
            f"data.{k}={v} (was {data.get(k)})" for k, v in overrides.items()), source)
    return {**data, **overrides}


def _module_kwargs(hparams: Mapping[str, Any], module: type = SegResNetModule
                   ) -> dict[str, Any]:
    """The `module` arguments among `hparams`, without the training-only ones."""
    accepted = set(inspect.signature(module.__init__).parameters) - {"self", *_SKIPPED}
    return {k: v for k, v in hparams.items() if k in accepted}


def vista3d_architecture(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Encoder width, blocks per level and input channels of a bare VISTA3D state dict (the
    bundle's vista3d132: 48, (1, 2, 2, 4, 4), 1), as `build_vista3d` arguments."""
    blocks: dict[int, int] = {}
    for key in state:
        match = VISTA3D_BLOCK.match(key)
        if match:
            level, block = int(match[1]), int(match[2])
            blocks[level] = max(blocks.get(level, 0), block + 1)
    stem = state.get(VISTA3D_STEM)
    if stem is None or not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{path}: VISTA3D weights ({VISTA3D_MARK}*) without the image encoder "
                         f"of vista3d132 ({VISTA3D_STEM}, image_encoder.encoder.layers.<level>."
                         "blocks.<n>.*); give the vista3d bundle's models/model.pt or a ctseg "
                         "VISTA3D checkpoint")
    return {"encoder_embed_dim": int(stem.shape[0]), "in_channels": int(stem.shape[1]),
            "blocks_down": tuple(blocks[level] for level in range(len(blocks)))}


def _load_vista3d(path: Path, obj: Any, state: Mapping[str, torch.Tensor],
                  overrides: Mapping[str, Any]) -> LoadedModel:
    """A VISTA3D from a ctseg checkpoint (its classes as VISTA3D ids) or a bare state dict such
    as the bundle's `model.pt` (its encoder size read from the weights, the 117 everything
    labels, inference.json's preprocessing); `overrides` (data.*) win over either."""
    roi: tuple[int, ...] | None = None
    if isinstance(obj, Mapping) and isinstance(obj.get(HPARAMS), Mapping):
        module = VISTA3DModule(**_module_kwargs(obj[HPARAMS], VISTA3DModule))
        net = module.net
        known = sorted(module.prompt_ids.tolist())
        data, source = dict(obj.get(DATA_HPARAMS) or {}), "the checkpoint"
        roi = tuple(int(r) for r in module.hparams.roi_size)
    else:
        net = build_vista3d(**vista3d_architecture(state, path))
        known, data = list(vista3d_labels().everything), dict(VISTA3D_BUNDLE_DATA)
        source = "the vista3d bundle's inference.json"
    load_into(net, state, source=path, head_prefix=VISTA3D_MARK)
    pipeline = pipeline_from(with_overrides(data, overrides, path, source))
    if roi is None or "patch_size" in overrides:
        roi = tuple(pipeline.patch_size)
    log.info("%s: VISTA3D, %d known ids, spacing %s mm, intensity %s, %s steps, window %s", path,
             len(known), pipeline.spacing, pipeline.intensity, pipeline.predict_steps, roi)
    return LoadedModel(net.eval(), [], pipeline, roi, kind="vista3d", known_ids=known)


def load_export(folder: Path, overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """The classes, preprocessing, window and exported files of an export folder; `overrides`
    (data.*) change the preprocessing, not the exported window (a ConfigError)."""
    manifest_path = folder / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise MissingFileError(f"{folder}: no {EXPORT_MANIFEST} in this folder; give a ctseg "
                               "checkpoint, bundle weights, or a folder written by python -m "
                               "ctseg.export")
    try:
        manifest = json.loads(manifest_path.read_text())
        formats = {fmt: str(entry["file"]) for fmt, entry in manifest["formats"].items()}
        digests = {fmt: str(entry["sha256"]) for fmt, entry in manifest["formats"].items()}
        pipeline_data = dict(manifest["pipeline"])
        roi = tuple(int(r) for r in manifest["roi_size"])
        kind, names = str(manifest["kind"]), list(manifest["label_names"])
        known = [int(i) for i in manifest.get("known_ids") or []]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{manifest_path}: not a ctseg export description ({err!r}); export "
                         "the checkpoint again with python -m ctseg.export") from err
    overrides = dict(overrides or {})
    if "patch_size" in overrides:
        raise ConfigError(f"data.patch_size={overrides['patch_size']}: {folder} runs the window "
                          f"it was exported with, {list(roi)}; set sw.roi_size for another one "
                          "or predict with the checkpoint")
    pipeline = pipeline_from(with_overrides(pipeline_data, overrides, folder, EXPORT_MANIFEST))
    log.info("%s: %s export (%s), spacing %s mm", folder, kind, ", ".join(formats),
             pipeline.spacing)
    return LoadedModel(None, names, pipeline, roi, kind=kind, known_ids=known,
                       export_dir=folder, formats=formats, digests=digests)


def load_model(path: str | Path, model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]
               ) -> LoadedModel:
    """The network and preprocessing of `path`: a Lightning `.ckpt` (its saved hyper-parameters
    win), a bare state dict (a SegResNet's classes from `model_cfg` / `data_cfg.version`, the
    bundle's inference.json preprocessing), or an export folder (or a file in one) written by
    `python -m ctseg.export`. Every preprocessing value set in `data_cfg` (not null) overrides
    the one these give."""
    path = Path(path)
    overrides = data_overrides(data_cfg)
    if path.is_dir():
        return load_export(path, overrides)
    if path.suffix in (".onnx", ".ts") and (path.parent / EXPORT_MANIFEST).is_file():
        exported = load_export(path.parent, overrides)
        formats = {f: name for f, name in exported.formats.items() if name == path.name}
        if not formats:
            raise ValueError(f"{path}: not listed in {path.parent / EXPORT_MANIFEST}; give the "
                             "export folder or one of its files")
        return replace(exported, formats=formats)
    obj = read_checkpoint(path)
    state = network_state_dict(obj, path)
    if any(k.startswith(VISTA3D_MARK) for k in state):
        return _load_vista3d(path, obj, state, overrides)
    found = head_classes(state, path)
    if isinstance(obj, Mapping) and isinstance(obj.get(HPARAMS), Mapping):
        hparams = dict(obj[HPARAMS])
        data = dict(obj.get(DATA_HPARAMS) or {})
        source, origin = "the checkpoint's hyper_parameters", "the checkpoint"
    else:
        # A bare state dict (a bundle model.pt) follows the bundle's inference.json: no smoothing.
        hparams = dict(model_cfg)
        data = {**WHOLEBODY_BUNDLE_DATA, **{k: data_cfg[k] for k in CLASS_KEYS if k in data_cfg}}
        source = "the model config (model.num_classes / data.version)"
        origin = "the wholeBody_ct_segmentation bundle's inference.json"
    version = data.get("version")
    names = hparams.get("label_names") or (label_names(version) if version else None)
    expected = int(hparams.get("num_classes") or len(names or ()))
    if names is not None and len(names) != expected:
        raise CheckpointError(f"{path}: {source} give {expected} classes but {len(names)} "
                              f"label names (data.version={version})")
    if version and num_classes(version) != expected:
        raise CheckpointError(f"{path}: {source} give {expected} classes but TotalSegmentator "
                              f"{version} has {num_classes(version)}; the checkpoint does not "
                              "match its data version")
    if found != expected:
        raise ValueError(f"{path}: the weights have {found} output classes but {source} expect "
                         f"{expected}; use a checkpoint trained for this class set or set "
                         f"data.version / model.num_classes to match it")
    hparams.update(num_classes=expected, label_names=names)
    module = SegResNetModule(**_module_kwargs(hparams))
    load_into(module.net, state, source=path)
    pipeline = pipeline_from(with_overrides(data, overrides, path, origin))
    roi = tuple(int(r) for r in (None if "patch_size" in overrides else hparams.get("roi_size"))
                or pipeline.patch_size)
    log.info("%s: %d classes, spacing %s mm, intensity %s, smoothing sigma %s", path, expected,
             pipeline.spacing, pipeline.intensity, pipeline.smooth_sigma)
    return LoadedModel(module.net.eval(), list(module.label_names), pipeline, roi)


def window_network(net: nn.Module, kind: str, known_ids: list[int]) -> nn.Module:
    """The module an export holds: the network itself (SegResNet) or VISTA3D's automatic mode
    over `known_ids`."""
    if kind == "vista3d":
        return AutomaticVISTA3D(net, known_ids).eval()
    return net.eval()
