"""Interactive VISTA3D clicks on one image: `ClickSession` loads and preprocesses the image once
and keeps, for every window a click touched, what the network computes from that window's image
alone, so a further click in those windows runs the point head only (and reuses the class head's
logits when the clicks go with a class id).

Per window, `WindowCache` holds:
- the point head's downsampled image features (`feat_downsample` of the image encoder's point
  branch, the point head's only use of the encoder output: an eighth of its voxels);
- the class head's logits by class id (clicks with a supported id);
- the window's last output and the clicks inside it: a window the new clicks do not fall in is
  not run again.

The network is MONAI's own `VISTA3D.forward` (`SessionVISTA3D`: its image encoder, class head and
the point head's `feat_downsample` look the window up first), and the windows, blending,
post-processing and inversion are predict.py's (`CasePredictor.vista3d_labels`, `input_labels`),
so the labels of a click equal a fresh predict.py run with all the session's clicks so far.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets.vista3d import VISTA3D
from torch import Tensor, nn

from ctseg.atomic import swapped_folder
from ctseg.errors import ConfigError
from ctseg.inference.inputs import Case, discover_cases
from ctseg.inference.outputs import LABELS_FILE, write_case
from ctseg.inference.pipeline import CasePredictor, PredictOptions, PreparedCase
from ctseg.inference.prompts import Prompt, check_points_inside, parse_prompt
from ctseg.inference.vista3d import warn_untrained_clicks
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.loading import load_model
from ctseg.sliding_window import label_dtype

log = logging.getLogger(__name__)

Start = tuple[int, int, int]


def _nbytes(tensor: Tensor | None) -> int:
    """Bytes held by `tensor` (0 for None)."""
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass
class WindowEntry:
    """What one window keeps: the point head's image features (with the shape and dtype of the
    encoder output they came from and their own dtype), the class head's (logits, class embedding,
    logits dtype) by class ids, and its last output with the prompt it was computed for."""

    features: Tensor | None = None
    source: tuple[torch.Size, torch.dtype] | None = None
    features_dtype: torch.dtype = torch.float32
    classes: dict[tuple[int, ...], tuple[Tensor, Tensor, torch.dtype]] = field(
        default_factory=dict)
    output: tuple[Hashable, Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the entry's tensors."""
        held = [self.features, *(t for c in self.classes.values() for t in c[:2]),
                None if self.output is None else self.output[1]]
        return sum(_nbytes(t) for t in held)


class WindowCache:
    """The entries of the windows clicks touched, least recently used first: features and class
    logits stored in at most `dtype`'s width (float16 halves float32 ones), at most `max_bytes`
    after each click (least recently used windows dropped; None: no limit)."""

    def __init__(self, dtype: torch.dtype = torch.float32, max_bytes: int | None = None) -> None:
        """An empty cache."""
        if not dtype.is_floating_point:
            raise ConfigError(f"cache_dtype must be a floating dtype (torch.float32, "
                              f"torch.float16, torch.bfloat16), got {dtype}")
        if max_bytes is not None and max_bytes < 0:
            raise ConfigError(f"max_cache_mb must be >= 0 (or None: no limit), got {max_bytes}")
        self.dtype, self.max_bytes = dtype, max_bytes
        self.entries: OrderedDict[Start, WindowEntry] = OrderedDict()
        self.window: Start | None = None
        self.class_key: tuple[int, ...] | None = None
        self.encoder_runs = 0

    def enter(self, window: Start, class_key: tuple[int, ...] | None) -> WindowEntry:
        """Start running `window` (with the class ids `class_key`); its entry, now the most
        recently used."""
        self.window, self.class_key = window, class_key
        entry = self.entries.setdefault(window, WindowEntry())
        self.entries.move_to_end(window)
        return entry

    def current(self) -> WindowEntry:
        """The entry of the window being run."""
        if self.window is None:
            raise RuntimeError("no window is being run: the cached modules run inside "
                               "SessionVISTA3D.forward only")
        return self.entries[self.window]

    def store(self, tensor: Tensor) -> Tensor:
        """A detached copy of `tensor` in the cache's dtype, or its own when that is narrower
        (float16 features under CUDA autocast stay float16)."""
        narrower = self.dtype.itemsize < tensor.dtype.itemsize
        return tensor.detach().to(self.dtype if narrower else tensor.dtype, copy=True)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(entry.nbytes for entry in self.entries.values())

    def trim(self) -> None:
        """Drop least recently used windows until the cache holds at most `max_bytes`."""
        while self.max_bytes is not None and self.entries and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        self.entries.clear()


class CachedEncoder(nn.Module):
    """The image encoder (`SegResNetDS2`), run only for the branches the window's entry lacks:
    the point branch when the point head's features are not cached (a zero-stride stand-in of
    the encoder output's shape and dtype otherwise), the class branch when the class head's
    logits for the prompted ids are not."""

    def __init__(self, encoder: nn.Module, cache: WindowCache) -> None:
        """Wrap `encoder` (shared, not copied)."""
        super().__init__()
        self.encoder, self.cache = encoder, cache

    def forward(self, x: Tensor, with_point: bool = True, with_label: bool = True
                ) -> tuple[Any, Any]:
        """(point branch, class branch) as `SegResNetDS2.forward` returns them."""
        entry = self.cache.current()
        point = with_point and entry.features is None
        label = with_label and self.cache.class_key not in entry.classes
        out: Any = None
        out_auto: Any = None
        if point or label:
            out, out_auto = self.encoder(x, with_point=point, with_label=label)
            self.cache.encoder_runs += 1
        if with_point and not point and entry.source is not None:  # features cached
            shape, dtype = entry.source
            out = torch.zeros((), dtype=dtype, device=x.device).expand(shape)
        return out, out_auto


class CachedDownsample(nn.Module):
    """The point head's `feat_downsample`, computed once per window."""

    def __init__(self, downsample: nn.Module, cache: WindowCache) -> None:
        """Wrap `downsample`."""
        super().__init__()
        self.downsample, self.cache = downsample, cache

    def forward(self, out: Tensor) -> Tensor:
        """The window's downsampled features (of `out`, the encoder's point branch, when they
        are not cached yet)."""
        entry = self.cache.current()
        if entry.features is None:
            features = self.downsample(out)
            entry.features, entry.features_dtype = self.cache.store(features), features.dtype
            entry.source = (out.shape, out.dtype)
            return features
        return entry.features.to(entry.features_dtype)


class CachedClassHead(nn.Module):
    """The class head (`ClassMappingClassify`), computed once per window and class ids; returns
    a copy (VISTA3D's click combination edits the logits in place)."""

    def __init__(self, head: nn.Module, cache: WindowCache) -> None:
        """Wrap `head` (shared, not copied)."""
        super().__init__()
        self.head, self.cache = head, cache

    def forward(self, src: Tensor, class_vector: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, class embeddings) as `ClassMappingClassify.forward` returns them."""
        entry = self.cache.current()
        key = _ids(class_vector)
        if key not in entry.classes:
            logits, embedding = self.head(src, class_vector)
            entry.classes[key] = (self.cache.store(logits), embedding.detach().clone(),
                                  logits.dtype)
            return logits, embedding
        logits, embedding, dtype = entry.classes[key]
        return logits.to(dtype, copy=True), embedding


def _ids(vector: Tensor | None) -> tuple[int, ...] | None:
    """The integers of a class vector as a tuple (None for None)."""
    return None if vector is None else tuple(int(i) for i in vector.flatten().tolist())


class SessionVISTA3D(VISTA3D):
    """`net`'s VISTA3D with a `WindowCache`: MONAI's forward, with the image encoder, the class
    head and the point head's feature downsampling looked up per window first, and a window's
    output reused while the clicks inside it, the class ids and the prompt class are unchanged.
    The encoder and class head are `net`'s own modules; the point head is a copy (a snapshot of
    `net`'s weights) whose `feat_downsample` is cached."""

    def __init__(self, net: VISTA3D, cache: WindowCache) -> None:
        """Wrap `net` (in eval mode) with `cache`."""
        point_head = copy.deepcopy(net.point_head)
        point_head.feat_downsample = CachedDownsample(point_head.feat_downsample, cache)
        super().__init__(CachedEncoder(net.image_encoder, cache),
                         CachedClassHead(net.class_head, cache), point_head)
        self.cache = cache
        self.eval()

    def forward(  # type: ignore[override]
        self,
        input_images: Tensor,
        patch_coords: list[Sequence[slice]] | None = None,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        class_vector: Tensor | None = None,
        prompt_class: Tensor | None = None,
        transpose: bool = False,
    ) -> Tensor:
        """VISTA3D's logits of one window (`patch_coords`: its slices in the padded image, as
        predict's window predictor passes them) for these prompts."""
        if patch_coords is None:
            raise ValueError("SessionVISTA3D runs windows of a sliding-window plan: pass "
                             "patch_coords (the window's slices in the padded image)")
        window = tuple(int(s.start) for s in patch_coords[0][2:])
        inside = None
        if point_coords is not None and point_labels is not None:
            coords, labels = self.update_point_to_patch(patch_coords[0], point_coords,
                                                        point_labels)
            if coords is not None and labels is not None:
                inside = (tuple(coords.flatten().tolist()), tuple(labels.flatten().tolist()))
        key = (inside, _ids(class_vector), _ids(prompt_class), transpose)
        entry = self.cache.enter(window, _ids(class_vector))
        if entry.output is not None and entry.output[0] == key:
            return entry.output[1].clone()
        out = super().forward(input_images, patch_coords=patch_coords, point_coords=point_coords,
                              point_labels=point_labels, class_vector=class_vector,
                              prompt_class=prompt_class, transpose=transpose)
        entry.output = (key, out.detach().clone())
        return out


def vista3d_model(model: LoadedModel | str | Path, needed_by: str) -> LoadedModel:
    """`model` (a VISTA3D `.ckpt`, the bundle's `model.pt` or a `LoadedModel`) loaded, its
    untrained point head warned of (once); ConfigError naming `needed_by` for any other model."""
    source = model if isinstance(model, (str, Path)) else "the checkpoint"
    if isinstance(model, (str, Path)):
        model = load_model(model, {}, {})
    if model.kind != "vista3d" or model.net is None:
        raise ConfigError(f"{needed_by} needs a VISTA3D checkpoint (.ckpt or the bundle's "
                          f"model.pt), got a {model.kind} "
                          f"{'export' if model.net is None else 'checkpoint'}")
    warn_untrained_clicks(model, source)
    return model


def _one_case(image: str | Path) -> Case:
    """The one case (NIfTI file or DICOM series folder) at `image`."""
    cases = discover_cases(image)
    if len(cases) != 1:
        raise ConfigError(f"{image}: a click session opens one image, this holds {len(cases)} "
                          f"({', '.join(c.name for c in cases[:5])}...); give one NIfTI file or "
                          "DICOM series folder")
    return cases[0]


class ClickSession:
    """Clicks on one image with a VISTA3D checkpoint, each returning the clicked structure's
    labels on the input's grid; open with `ClickSession.open(ckpt, image)`.

    Clicks accumulate (`reset` starts another structure); `prompt` holds them as predict.py's
    `prompt` (points, point_labels, the label as labels, point_window), and the labels of a click
    equal predict.py's with that prompt. `point_window=True` (predict's default, as the bundle)
    centres one window on each click, so every click at a new place encodes its window;
    `point_window=False` runs the sliding-window grid's windows, so further clicks in windows
    already clicked run the heads only. Memory: `cache_bytes` (windows touched only;
    `cache_dtype=torch.float16` halves it, `max_cache_mb` bounds it, least recently used windows
    first)."""

    def __init__(self, predictor: CasePredictor, prepared: PreparedCase, cache: WindowCache,
                 point_window: bool = True) -> None:
        """A session on the preprocessed `prepared` run by `predictor` (a VISTA3D checkpoint)."""
        net = predictor.model.net
        if not isinstance(net, VISTA3D):
            raise ConfigError(f"a click session needs a VISTA3D checkpoint; this one is a "
                              f"{predictor.model.kind}")
        self.predictor, self.prepared, self.cache = predictor, prepared, cache
        self.net = SessionVISTA3D(net, cache)
        self.prompt = Prompt(point_window=point_window)
        self.names: dict[int, str] = {}
        self.labels: np.ndarray | None = None

    @classmethod
    def open(cls, model: LoadedModel | str | Path, image: Case | str | Path, device: str = "cpu",
             point_window: bool = True, cache_dtype: torch.dtype = torch.float32,
             max_cache_mb: float | None = None, **options: Any) -> ClickSession:
        """Load `model` (a VISTA3D `.ckpt`, the bundle's `model.pt` or a `LoadedModel`), load
        and preprocess `image` (a NIfTI file or DICOM series folder) on `device`; `options` are
        further `PredictOptions` (overlap, mode, amp, cpu_bf16, series_uid, ...)."""
        refused = sorted({"prompt", "backend", "probabilities"} & set(options))
        if refused:
            raise ConfigError(f"ClickSession.open: {', '.join(refused)} cannot be set; clicks "
                              "come with click(), and a session runs the torch network")
        model = vista3d_model(model, "a click session")
        case = image if isinstance(image, Case) else _one_case(image)
        cache = WindowCache(cache_dtype, None if max_cache_mb is None
                            else int(max_cache_mb * 2**20))
        predictor = CasePredictor(model, PredictOptions(device=device, backend="torch",
                                                        **options))
        try:
            prepared = predictor.prepare(case, Prompt())
            return cls(predictor, prepared, cache, point_window)
        except BaseException:
            predictor.close()
            raise

    def __enter__(self) -> ClickSession:
        """The session itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the session."""
        self.close()

    def close(self) -> None:
        """Drop the cache and release the predictor."""
        self.cache.clear()
        self.predictor.close()

    @property
    def points(self) -> tuple[tuple[float, float, float], ...]:
        """The clicks so far (input-file voxel indices)."""
        return self.prompt.points

    @property
    def point_labels(self) -> tuple[int, ...]:
        """The labels of the clicks so far (1 positive, 0 negative)."""
        return self.prompt.point_labels

    @property
    def label(self) -> int | None:
        """The VISTA3D id the clicks so far go with (None: the clicked structure)."""
        return self.prompt.label

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds (features, class logits and window outputs)."""
        return self.cache.nbytes

    @property
    def cached_windows(self) -> int:
        """Windows the cache holds."""
        return len(self.cache.entries)

    @property
    def encoder_runs(self) -> int:
        """Times the image encoder ran in this session (once per new window and branch)."""
        return self.cache.encoder_runs

    def _with_clicks(self, points: Sequence[Sequence[float]],
                     point_labels: Sequence[int] | None, label: int | None) -> Prompt:
        """The prompt of the session's clicks followed by `points` (checked as predict.py
        checks `prompt`); ConfigError when `label` differs from the clicks' so far."""
        if self.points and label != self.label:
            raise ConfigError(f"the clicks so far go with label {self.label}, this one with "
                              f"{label}; call reset() to segment another structure")
        new = [p.tolist() if isinstance(p, np.ndarray) else p for p in points]
        labels = [1] * len(new) if point_labels is None else list(point_labels)
        prompt = parse_prompt({"labels": None if label is None else [label],
                               "points": [*self.points, *new],
                               "point_labels": [*self.point_labels, *labels],
                               "point_window": self.prompt.point_window})
        check_points_inside(prompt, self.prepared.shape, self.prepared.case.path)
        return prompt

    def click(self, points: Sequence[Sequence[float]], point_labels: Sequence[int] | None = None,
              label: int | None = None) -> np.ndarray:
        """Add clicks and return the structure's labels on the input's grid: `points` as
        [x, y, z] voxel indices of the input file, `point_labels` 1 positive (the default) or 0
        negative, `label` the VISTA3D id they go with (None: the clicked structure, labelled 1)."""
        prompt = self._with_clicks(points, point_labels, label)
        start, runs = time.perf_counter(), self.cache.encoder_runs
        grid, names = self.predictor.vista3d_labels(self.prepared, prompt, self.net)
        self.labels = self.predictor.input_labels(self.prepared, grid,
                                                  label_dtype(max(names) + 1))
        self.prompt, self.names = prompt, names
        self.cache.trim()
        log.debug("click %d: %.2f s, %d encoder runs, cache %.1f MiB in %d windows",
                 len(self.points), time.perf_counter() - start, self.cache.encoder_runs - runs,
                 self.cache_bytes / 2**20, self.cached_windows)
        return self.labels

    def reset(self) -> None:
        """Forget the clicks (the cache stays) to segment another structure."""
        self.prompt = Prompt(point_window=self.prompt.point_window)
        self.names, self.labels = {}, None

    def save(self, folder: str | Path, masks: bool = False) -> Path:
        """Write the last click's labels into `folder` as predict.py writes a case
        (labels.nii.gz in the input's geometry, labels.json, colour tables; `masks`: one file
        per structure), replacing it; the folder."""
        if self.labels is None:
            raise ConfigError("nothing to save: click first (or again after reset())")
        folder = Path(folder)
        with swapped_folder(folder, own=LABELS_FILE) as tmp:
            write_case(tmp, self.labels, self.prepared.affine, self.prepared.header, self.names,
                       masks, {})
        return folder
