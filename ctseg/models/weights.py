"""Network weights: read MONAI bundle `model.pt` files or ctseg checkpoints, load and save them."""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctseg.atomic import write_atomic
from ctseg.errors import CheckpointError, MissingFileError, out_of_memory

log = logging.getLogger(__name__)

# Prefix of the network's keys in a ctseg Lightning checkpoint (the module keeps it at `self.net`).
NET_PREFIX = "net."
# Keys of SegResNet's output layer (`conv_final`: GroupNorm, ReLU, 1x1x1 conv to the classes).
SEGRESNET_HEAD = "conv_final.2."
# How many offending keys an error message lists.
_SHOWN = 5
# What torch.load(weights_only=True) raises for a file that is not a readable checkpoint, found
# by loading empty, truncated, garbage and byte-flipped checkpoints and files of other formats
# (tests/models/test_weights.py sweeps them): its zip reader's OSError and RuntimeError, the
# unpickler's UnpicklingError, EOFError, struct.error, IndexError, KeyError and ValueError
# (UnicodeDecodeError), and the TypeError, AttributeError and AssertionError of rebuilding
# tensors from corrupt records. A MemoryError, or PyTorch running out of memory, passes.
UNREADABLE: tuple[type[Exception], ...] = (
    OSError, RuntimeError, pickle.UnpicklingError, EOFError, struct.error, IndexError, KeyError,
    ValueError, TypeError, AttributeError, AssertionError)


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """The state dict inside a loaded file: plain, under "state_dict" / "model", else an error."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return obj
    raise CheckpointError(
        f"{path}: not a network state dict (expected a mapping of parameter names to tensors, "
        f"or one under a 'state_dict' or 'model' key); found {type(obj).__name__}"
    )


def read_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint",
                    mmap: bool = False) -> Any:
    """The object stored in a checkpoint or weights file, loaded on the CPU with
    `torch.load(weights_only=True)`: tensors and plain containers only, never pickled objects,
    which could run code on load. `mmap=True` maps tensors instead of reading them (a cheap check).

    MissingFileError / CheckpointError name the file and say what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except UNREADABLE as err:
        if out_of_memory(err):
            raise
        text = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to load the {what}: it holds a pickled Python object "
                f"({unsafe.group(1)}), and unpickling it could run arbitrary code (ctseg loads "
                "with weights_only=True; its own checkpoints never need more). If you trust the "
                "file, re-save only the network's state dict, or the checkpoint with plain "
                "hyper-parameters") from err
        if mmap and "mmap" in text:
            return read_checkpoint(path, what)
        detail = f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
        raise CheckpointError(f"{path}: cannot read the {what} (corrupt, truncated, or not a "
                              f"readable PyTorch file; {textwrap.shorten(detail, 160)})") from err


def load_bundle_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read the network weights of a bundle `model.pt`, a `{"state_dict"|"model": ...}` file or a
    ctseg Lightning `.ckpt` (its `net.` prefix stripped, other module state dropped), on the CPU,
    safely (`read_checkpoint`)."""
    return network_state_dict(read_checkpoint(path, "pretrained weights file"), path)


def checkpoint_label_names(obj: Any) -> list[str] | None:
    """The class names a loaded ctseg checkpoint was trained on (its hyper-parameters), or None
    for other weights files."""
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    names = hparams.get("label_names") if isinstance(hparams, dict) else None
    return [str(n) for n in names] if isinstance(names, list | tuple) else None


def head_by_name(own: Mapping[str, Tensor], theirs: Mapping[str, Tensor], keys: Sequence[str],
                 old_names: Sequence[str], new_names: Sequence[str]) -> dict[str, Tensor]:
    """Output-layer tensors for `new_names`: the rows (dim 0) of the classes the weights were
    trained on copied from `theirs` by class name, those of new classes kept from `own` (their
    fresh initialisation)."""
    rows = [(i, list(old_names).index(name)) for i, name in enumerate(new_names)
            if name in old_names]
    head = {}
    for key in keys:
        tensor = own[key].clone()
        for new, old in rows:
            tensor[new] = theirs[key][old]
        head[key] = tensor
    return head


def network_state_dict(obj: Any, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The network weights inside an already loaded weights file `obj` read from `path` (plain,
    under "state_dict"/"model", or a ctseg checkpoint whose `net.` prefix is stripped)."""
    path = Path(path)
    state = _unwrap(obj, path)
    if any(k.startswith(NET_PREFIX) for k in state):
        state = {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a network state dict; entries that are not tensors: "
                              f"{', '.join(map(str, bad[:_SHOWN]))}")
    return dict(state)


def _listing(keys: list[str]) -> str:
    """A few keys for an error message, with how many more there are."""
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_into(
    net: nn.Module,
    state_dict: Mapping[str, Tensor],
    reinit_head: bool = False,
    source: str | os.PathLike[str] = "<state dict>",
    head_prefix: str = SEGRESNET_HEAD,
    label_names: tuple[Sequence[str] | None, Sequence[str]] | None = None,
) -> None:
    """Copy `state_dict` into `net`; every key and shape must match, except the output layer.

    When only the output layer (keys under `head_prefix`) differs in shape, i.e. the weights were
    trained for another class count: with `label_names` = (the weights' classes, the model's)
    and the first a subset of the second, the known classes keep their output weights and the
    new ones their fresh initialisation (adding classes to a trained model); otherwise a
    CheckpointError says so unless `reinit_head` is set. With `reinit_head=True` the output layer is
    never loaded and keeps its fresh initialisation.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    body_mismatch = [k for k in mismatched if not k.startswith(head_prefix)]
    if body_mismatch:
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in sorted(body_mismatch)[:_SHOWN]]
        problems.append(f"shape mismatches (file vs model): {'; '.join(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the network architecture; "
                              + "; ".join(problems) + "; choose the model config they were "
                              "trained with (the wholeBody_ct_segmentation bundle's model.pt "
                              "needs model=segresnet)")
    head = [k for k in own if k.startswith(head_prefix)]
    old, new = label_names if label_names is not None else (None, ())
    if mismatched and not reinit_head and old is not None and set(old) <= set(new) \
            and all(state_dict[k].shape[0] == len(old) for k in head):
        state_dict = {**state_dict, **head_by_name(own, state_dict, head, old, new)}
        added = [n for n in new if n not in old]
        log.info("%s: kept the output weights of its %d classes; %d new class(es) start freshly "
                 "initialised: %s", source, len(old), len(added), ", ".join(added))
    elif mismatched and not reinit_head:
        key = mismatched[0]
        raise CheckpointError(
            f"{source}: the weights have {state_dict[key].shape[0]} output classes but the model "
            f"has {own[key].shape[0]}; set model.reinit_head=true to fine-tune from them with a "
            "freshly initialised output layer (a ctseg checkpoint whose classes are all among "
            "the model's keeps them: data.extra_classes adds classes)"
        )
    if reinit_head:
        state_dict = {**state_dict, **{k: own[k] for k in head}}
        log.info("%s: loaded all weights except the output layer (%s), which stays freshly "
                 "initialised", source, ", ".join(head))
    net.load_state_dict(state_dict, strict=True)


def bundle_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The plain network state dict of a ctseg module (keys as in a bundle `model.pt`), on CPU."""
    return {k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()}


def save_bundle_state_dict(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write `bundle_state_dict(module)` atomically to `path` (e.g. a bundle's models/model.pt)."""
    state = bundle_state_dict(module)
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    return Path(path)
