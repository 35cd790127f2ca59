"""Build the network and the preprocessing of a prediction from a ctseg checkpoint or a bundle
state dict (`model.pt`), checking that the class count fits the configuration.

Preprocessing comes from the checkpoint (a ctseg `.ckpt`, an export folder) or the bundle's
inference.json (a bare `model.pt`); every `data.*` value set on the command line overrides it, and
a value that cannot be honoured is an error, never ignored."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn

from ctseg.data.transforms import HU_WINDOW, PipelineConfig
from ctseg.errors import CheckpointError, ConfigError, MissingFileError
from ctseg.labels import label_names, num_classes
from ctseg.models.base import MODULE_CLASS, SegmentationModule
from ctseg.models.loaded_model import LoadedModel
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
LIGHTNING_VERSION = "pytorch-lightning_version"
# Preprocessing settings that prediction takes from a checkpoint or the `data` config.
PREDICT_KEYS = ("spacing", "intensity", "hu_window", "patch_size", "smooth_sigma", "predict_steps")
# Other keys of predict.py's `data` config: the class table of a bare SegResNet state dict.
CLASS_KEYS = ("version",)
# Keys only a VISTA3D state dict has (its class head).
VISTA3D_MARK = "class_head."
# model config keys that shape a bare SegResNet state dict's network.
SEGRESNET_ARCHITECTURE = ("in_channels", "init_filters", "blocks_down", "blocks_up", "dropout_prob",
                          "norm", "spatial_dims")
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


# The class paths a checkpoint may name: a class of a module of ctseg.models.
MODEL_CLASS_PATH = re.compile(r"ctseg\.models\.[a-z_][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")

# The description of an export folder (written by ctseg.export).
EXPORT_MANIFEST = "export.json"


def head_classes(state: Mapping[str, torch.Tensor], path: Path) -> int:
    """Output classes of a SegResNet state dict (rows of its final convolution)."""
    weights = [v for k, v in state.items() if k.startswith(SEGRESNET_HEAD) and k.endswith("weight")]
    if not weights:
        raise CheckpointError(f"{path}: no SegResNet output layer ({SEGRESNET_HEAD}*) in the "
                              "weights; give a SegResNet state dict (the wholeBody_ct_segmentation "
                              "bundle's model.pt), the vista3d bundle's model.pt, a ctseg "
                              "checkpoint or an export folder")
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
        raise CheckpointError(f"{path}: VISTA3D weights ({VISTA3D_MARK}*) without the image "
                              f"encoder of vista3d132 ({VISTA3D_STEM}, "
                              "image_encoder.encoder.layers.<level>.blocks.<n>.*); give the "
                              "vista3d bundle's models/model.pt or a ctseg VISTA3D checkpoint")
    return {"encoder_embed_dim": int(stem.shape[0]), "in_channels": int(stem.shape[1]),
            "blocks_down": tuple(blocks[level] for level in range(len(blocks)))}


def _load_vista3d_state(path: Path, state: Mapping[str, torch.Tensor],
                        overrides: Mapping[str, Any]) -> LoadedModel:
    """A VISTA3D from a bare state dict such as the bundle's `model.pt`: its encoder size read
    from the weights, the 117 everything labels, inference.json's preprocessing (`overrides`,
    data.*, win)."""
    net = build_vista3d(**vista3d_architecture(state, path))
    load_into(net, state, source=path, head_prefix=VISTA3D_MARK)
    pipeline = pipeline_from(with_overrides(dict(VISTA3D_BUNDLE_DATA), overrides, path,
                                            "the vista3d bundle's inference.json"))
    return LoadedModel(net.eval(), [], pipeline, tuple(pipeline.patch_size), kind="vista3d",
                       known_ids=list(vista3d_labels().everything))


def module_class(path: Path, checkpoint: Mapping[str, Any],
                 state: Mapping[str, torch.Tensor]) -> type[SegmentationModule]:
    """The module class a Lightning checkpoint records; for one without (saved by hand from a
    state dict and hyper-parameters) VISTA3D or SegResNet by its weights. A name that is not
    `ctseg.models.<module>.<Class>` is refused before anything is imported: importing runs the
    named module's code."""
    name = checkpoint.get(MODULE_CLASS)
    if name is None:
        return VISTA3DModule if any(k.startswith(VISTA3D_MARK) for k in state) else SegResNetModule
    if not (isinstance(name, str) and MODEL_CLASS_PATH.fullmatch(name)):
        raise CheckpointError(f"{path}: its module class {name} is not a ctseg model class "
                              "(ctseg.models.<module>.<Class>); refusing to import it. Give a "
                              "checkpoint written by ctseg's train.py")
    try:
        cls = get_class(str(name))
    except (ImportError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path}: its module class {name} cannot be imported ({err}); "
                              "install the ctseg version that wrote it") from err
    if not (isinstance(cls, type) and issubclass(cls, SegmentationModule)):
        raise CheckpointError(f"{path}: {name} is not a ctseg SegmentationModule")
    return cls


def check_classes(path: Path, state: Mapping[str, torch.Tensor], hparams: Mapping[str, Any],
                  version: str | None, source: str) -> tuple[int, list[str] | None]:
    """The class count and names `hparams` (or the TotalSegmentator `version`) give, checked
    against each other and against a SegResNet output layer's rows when `state` has one."""
    names = hparams.get("label_names") or (label_names(version) if version else None)
    expected = int(hparams.get("num_classes") or len(names or ()))
    if names is not None and len(names) != expected:
        raise CheckpointError(f"{path}: {source} give {expected} classes but {len(names)} "
                              f"label names (data.version={version})")
    if version and num_classes(version) != expected:
        raise CheckpointError(f"{path}: {source} give {expected} classes but TotalSegmentator "
                              f"{version} has {num_classes(version)}; the checkpoint does not "
                              "match its data version")
    if any(k.startswith(SEGRESNET_HEAD) for k in state):
        found = head_classes(state, path)
        if found != expected:
            raise CheckpointError(
                f"{path}: the weights have {found} output classes but {source} expect "
                f"{expected}; a bare state dict takes its classes from data.version (v1: "
                f"{num_classes('v1')}, v2: {num_classes('v2')} classes) and a ctseg checkpoint "
                "from its hyper_parameters: give weights trained for one of these class sets")
    return expected, None if names is None else list(names)


def _load_lightning(path: Path, checkpoint: Mapping[str, Any],
                    state: Mapping[str, torch.Tensor], overrides: Mapping[str, Any]
                    ) -> LoadedModel:
    """A module rebuilt by Lightning's `load_from_checkpoint` (weights only) from the class the
    checkpoint records, as its `inference_model` with the checkpoint's preprocessing."""
    if LIGHTNING_VERSION not in checkpoint:
        raise CheckpointError(f"{path}: hyper-parameters without a {LIGHTNING_VERSION}: not "
                              "written by Lightning's Trainer; give a checkpoint from train.py or "
                              "the network's state dict alone")
    cls = module_class(path, checkpoint, state)
    data = dict(checkpoint.get(DATA_HPARAMS) or {})
    check_classes(path, state, checkpoint[HPARAMS], data.get("version"),
                  "the checkpoint's hyper_parameters")
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True,
                                          pretrained=None, optimizer=None)
    except (TypeError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: {cls.__name__} cannot be rebuilt from it ({err}); was it "
                              "written by another ctseg version? Predict with that version or "
                              "train again") from err
    pipeline = pipeline_from(with_overrides(data, overrides, path, "the checkpoint"))
    model = module.eval().inference_model(pipeline)
    if "patch_size" in overrides:
        model = replace(model, roi_size=tuple(pipeline.patch_size))
    log.info("%s: %s, %s, spacing %s mm, intensity %s, smoothing sigma %s, window %s", path,
             cls.__name__, f"{len(model.known_ids)} known ids" if model.kind == "vista3d"
             else f"{model.num_classes} classes", pipeline.spacing, pipeline.intensity,
             pipeline.smooth_sigma, model.roi_size)
    return model


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
        limits = {fmt: int(entry["max_batch"]) for fmt, entry in manifest["formats"].items()
                  if "max_batch" in entry}
        pipeline_data = dict(manifest["pipeline"])
        roi = tuple(int(r) for r in manifest["roi_size"])
        kind, names = str(manifest["kind"]), list(manifest["label_names"])
        known = [int(i) for i in manifest.get("known_ids") or []]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest_path}: not a ctseg export description ({err!r}); "
                              "export the checkpoint again with python -m ctseg.export") from err
    overrides = dict(overrides or {})
    if "patch_size" in overrides:
        raise ConfigError(f"data.patch_size={overrides['patch_size']}: {folder} runs the window "
                          f"it was exported with, {list(roi)}; set sw.roi_size for another one "
                          "or predict with the checkpoint")
    pipeline = pipeline_from(with_overrides(pipeline_data, overrides, folder, EXPORT_MANIFEST))
    log.info("%s: %s export (%s), spacing %s mm", folder, kind, ", ".join(formats),
             pipeline.spacing)
    return LoadedModel(None, names, pipeline, roi, kind=kind, known_ids=known,
                       export_dir=folder, formats=formats, digests=digests, batch_limits=limits)


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
            raise CheckpointError(f"{path}: not listed in {path.parent / EXPORT_MANIFEST}; give "
                                  "the export folder or one of its files")
        return replace(exported, formats=formats)
    obj = read_checkpoint(path, mmap=True)
    state = network_state_dict(obj, path)
    if isinstance(obj, Mapping) and isinstance(obj.get(HPARAMS), Mapping):
        return _load_lightning(path, obj, state, overrides)
    if any(k.startswith(VISTA3D_MARK) for k in state):
        return _load_vista3d_state(path, state, overrides)
    # A bare state dict (a bundle model.pt) follows the bundle's inference.json: no smoothing.
    data = {**WHOLEBODY_BUNDLE_DATA, **{k: data_cfg[k] for k in CLASS_KEYS if k in data_cfg}}
    head_classes(state, path)
    if not data.get("version"):
        raise ConfigError(f"data.version=null: a bare SegResNet state dict ({path}) takes its "
                          f"class names from data.version; set v1 ({num_classes('v1')} classes) "
                          f"or v2 ({num_classes('v2')})")
    expected, names = check_classes(path, state, model_cfg, data.get("version"),
                                    "the model config (model.num_classes / data.version)")
    net = SegResNetModule(**{k: v for k, v in model_cfg.items() if k in SEGRESNET_ARCHITECTURE},
                          num_classes=expected, label_names=names).net
    load_into(net, state, source=path)
    pipeline = pipeline_from(with_overrides(
        data, overrides, path, "the wholeBody_ct_segmentation bundle's inference.json"))
    log.info("%s: %d classes, spacing %s mm, intensity %s, smoothing sigma %s", path, expected,
             pipeline.spacing, pipeline.intensity, pipeline.smooth_sigma)
    roi = tuple(int(r) for r in (None if "patch_size" in overrides else model_cfg.get("roi_size"))
                or pipeline.patch_size)
    return LoadedModel(net.eval(), list(names or ()), pipeline, roi)


def window_network(net: nn.Module, kind: str, known_ids: list[int]) -> nn.Module:
    """The module an export holds: the network itself (SegResNet) or VISTA3D's automatic mode
    over `known_ids`."""
    if kind == "vista3d":
        return AutomaticVISTA3D(net, known_ids).eval()
    return net.eval()
