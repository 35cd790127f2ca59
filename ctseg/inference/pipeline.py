"""Prediction of one case: preprocess as in training, memory-bounded sliding window, argmax,
invert to the input grid (nearest neighbour), save; with a per-stage timing report."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged

from ctseg.atomic import swapped_folder
from ctseg.data.transforms import IMAGE, infer_transforms
from ctseg.errors import ConfigError, DatasetError
from ctseg.inference.air import body_mask, body_window_starts
from ctseg.inference.backends import open_runner
from ctseg.inference.dicom_seg import SEG_FILE, series_datasets, write_dicom_seg
from ctseg.inference.ensemble import TTA_MODES, MeanLogits, mirror_flips
from ctseg.inference.inputs import Case, load_case
from ctseg.inference.outputs import LABELS_FILE, write_case
from ctseg.inference.placement import (
    AUTO,
    MAX_AUTO_BATCH,
    Placement,
    fixed_placement,
    forward_bytes,
    free_memory,
    plan_placement,
)
from ctseg.inference.postprocess import keep_largest
from ctseg.inference.prompts import OUTSIDE_NAME, Prompt, check_points_inside
from ctseg.inference.record import write_record
from ctseg.inference.vista3d import (
    keep_clicked_components,
    plan_case,
    plan_exported,
    to_model_grid,
    warn_untrained_clicks,
    window_coverage,
)
from ctseg.models.loaded_model import LoadedModel
from ctseg.sliding_window import (
    BATCH_SIZE,
    BLEND_MODES,
    MODE,
    OVERLAP,
    PAD_MODES,
    label_dtype,
    pad_to_roi,
    sliding_window_predict,
)

log = logging.getLogger(__name__)

PRED = "pred"
STAGES = ("load", "preprocess", "inference", "postprocess", "save")


# Accumulator dtypes of the sliding-window blend (`sw.accum_dtype`; None: the image's, float32).
ACCUM_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class PredictOptions:
    """Sliding-window, device and output settings of a prediction run."""

    roi_size: Sequence[int] | None = None
    overlap: float = OVERLAP
    mode: str = MODE
    padding_mode: str | None = None
    sw_batch_size: int | str = BATCH_SIZE
    slab_axis: int | None = None
    accum_dtype: str | None = None
    skip_air: bool = False
    device: str = "auto"
    amp: bool = True
    gpu_preprocessing: bool = True
    cpu_bf16: bool = False
    backend: str = "auto"
    channels_last: bool = True
    masks: bool = True
    probabilities: Sequence[str | int] = field(default_factory=tuple)
    series_uid: str | None = None
    dicom_seg: bool = False
    prompt: Prompt = field(default_factory=Prompt)
    tta: str | None = None
    tta_axes: Sequence[int] = (0, 1, 2)
    largest_component: Sequence[str] = ()

    def __post_init__(self) -> None:
        """Refuse, before any work, sliding-window values the blend cannot use."""
        if self.accum_dtype is not None and self.accum_dtype not in ACCUM_DTYPES:
            raise ConfigError(f"sw.accum_dtype: {self.accum_dtype!r} is not one of "
                              f"{', '.join(ACCUM_DTYPES)} (or null: float32)")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"sw.overlap={self.overlap}: the windows' overlap is a fraction "
                              "in [0, 1), e.g. 0.25 or 0.5")
        if self.mode not in BLEND_MODES:
            raise ConfigError(f"sw.mode={self.mode}: choose {' or '.join(BLEND_MODES)}")
        if self.padding_mode is not None and self.padding_mode not in PAD_MODES:
            raise ConfigError(f"sw.padding_mode={self.padding_mode}: choose one of "
                              f"{', '.join(PAD_MODES)} (or null: the model's)")
        batch = self.sw_batch_size
        if batch != AUTO and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ConfigError(f"sw.batch_size={batch}: windows per batch: a whole number >= 1, "
                              f"or {AUTO} (from the free GPU memory)")
        if self.tta is not None and self.tta not in TTA_MODES:
            raise ConfigError(f"tta={self.tta}: choose {' or '.join(TTA_MODES)} (or null: none)")
        if self.tta is not None:
            mirror_flips(self.tta_axes)  # checks the axes
        if self.slab_axis is not None and self.slab_axis not in range(-3, 3):
            raise ConfigError(f"sw.slab_axis={self.slab_axis}: an axis in -3..2, or null (the "
                              "axis that needs the smallest accumulator)")

    @property
    def accumulator(self) -> torch.dtype | None:
        """The accumulator's torch dtype (None: the image's)."""
        return None if self.accum_dtype is None else getattr(torch, self.accum_dtype)


@dataclass(frozen=True)
class Segmentation:
    """A case's labels on its input grid, with what its outputs need: the input's affine and
    NIfTI header (None for DICOM), the label names, inverted probabilities by class, and the
    shape of the model grid the network ran on."""

    labels: np.ndarray
    affine: np.ndarray
    header: Any
    names: Sequence[str] | dict[int, str]
    probabilities: dict[int, np.ndarray]
    model_grid: tuple[int, ...]
    windows: dict[str, int] = field(default_factory=dict)


@dataclass
class CaseRun:
    """A case on its way through load, inference and save (`CasePredictor.load`, `infer`,
    `save`, each of which may run in its own thread), with its stage timings."""

    case: Case
    times: dict[str, float] = field(default_factory=dict)
    prepared: PreparedCase | None = None
    seg: Segmentation | None = None
    peak_gpu_mb: float | None = None


@dataclass(frozen=True)
class PreparedCase:
    """A loaded and preprocessed case: the input as loaded (`image`; preprocessing on the CPU may
    have changed its values in place: its affine and shape stay), the preprocessed data, the
    input's shape, affine and NIfTI header (None for DICOM), and with sw.skip_air the mask of its
    voxels above the air threshold, taken before preprocessing."""

    case: Case
    image: MetaTensor
    data: dict[str, Any]
    shape: tuple[int, ...]
    affine: np.ndarray
    header: Any
    body: np.ndarray | None = None


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use "
                          "device=cpu or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name}: choose cpu, cuda, cuda:N or auto")
    return device


def class_indices(names: Sequence[str], wanted: Sequence[str | int]) -> list[int]:
    """Class indices of `wanted` structure names or indices; ValueError naming unknown ones."""
    indices = []
    for item in wanted:
        if isinstance(item, int) or str(item).isdigit():
            index = int(item)
            if not 0 <= index < len(names):
                raise ConfigError(f"probabilities: class index {index} outside 0..{len(names) - 1}")
        elif item in names:
            index = list(names).index(item)
        else:
            raise ConfigError(f"probabilities: unknown structure {item!r}; names are those of "
                             "labels.json (e.g. liver, spleen)")
        indices.append(index)
    return sorted(set(indices))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seg_failure(err: Exception, source: Path, folder: Path) -> Exception:
    """The error that fails a case whose DICOM SEG `err` stopped after its NIfTI outputs were
    written to `folder`: a DatasetError (a problem of the series, highdicom's refusals included)
    keeps its type and file; anything else is unexpected and says its type and the series."""
    kept = f"no {SEG_FILE}; the NIfTI outputs are in {folder}, overwrite=true redoes the case"
    if isinstance(err, DatasetError):
        return DatasetError(err.path, f"{err.problem} ({kept})")
    return RuntimeError(f"{source}: writing the DICOM SEG failed ({type(err).__name__}: {err}); "
                        f"{kept}")


class CasePredictor:
    """Runs `LoadedModel` on cases: one instance per run (a context manager: temporary exports
    of the backend live until it closes), `predict(case, folder)` per case."""

    def __init__(self, model: LoadedModel, options: PredictOptions,
                 members: Sequence[LoadedModel] = ()) -> None:
        """Prepare transforms, device and the network for `options`; `members` (other models of
        `model`'s classes and preprocessing) and `options.tta` average window logits."""
        self.model, self.options = model, options
        self.device = resolve_device(options.device)
        self.amp = options.amp and self.device.type == "cuda"
        # Autocast dtype: float16 on CUDA with AMP, bfloat16 on CPU when asked for, else none.
        self.autocast_dtype = torch.float16 if self.amp else (
            torch.bfloat16 if options.cpu_bf16 and self.device.type == "cpu" else None)
        self.vista3d = model.kind == "vista3d"
        if self.vista3d and options.probabilities:
            raise ConfigError("probabilities are written for SegResNet checkpoints only; VISTA3D "
                              "outputs are label maps (remove probabilities=...)")
        prompt = options.prompt
        if not self.vista3d and (prompt.labels or prompt.has_points):
            raise ConfigError("prompt.labels / prompt.points need a VISTA3D checkpoint; "
                              f"this one is a {model.kind} (remove the prompt)")
        if prompt.has_points:
            warn_untrained_clicks(model, "the checkpoint")
        self.keep = class_indices(model.label_names, options.probabilities)
        if self.vista3d and options.largest_component:
            raise ConfigError("post-processing (postprocessing.json) applies to SegResNet "
                              "checkpoints; this one is a VISTA3D")
        self.largest_component = class_indices(model.label_names, options.largest_component)
        steps = list(infer_transforms(model.pipeline).transforms)
        if isinstance(steps[0], LoadImaged):
            steps = steps[1:]  # cases are loaded by ctseg.inference.inputs (NIfTI or DICOM)
        self.transforms = Compose(steps)
        self.roi = tuple(options.roi_size or model.roi_size)
        # Padding of a volume thinner than a window: the bundles' (wholeBody inference.json
        # replicates, VISTA3D's inferers pad with zeros) unless sw.padding_mode says otherwise.
        self.padding_mode = options.padding_mode or ("constant" if self.vista3d else "replicate")
        self._stack = ExitStack()
        self.runner, self.format, limit = open_runner(model, options.backend, self.device,
                                                      self.amp, options.channels_last,
                                                      self._stack, options.sw_batch_size)
        limits = [limit]
        # VISTA3D's torch windows are planned per case (plan_case): its members' networks and
        # the flips are averaged there; every other runner is averaged here.
        self.averaged: tuple[list[torch.nn.Module], list[tuple[int, ...]]] | None = None
        if members or options.tta:
            if self.vista3d and prompt.has_points:
                raise ConfigError("clicks (prompt.points) run one VISTA3D checkpoint without "
                                  "tta; remove the list of checkpoints or tta")
            flips = mirror_flips(options.tta_axes) if options.tta else [()]
            log.info("averaging the logits of %d model(s) x %d mirroring(s) per window",
                     1 + len(members), len(flips))
            if self.vista3d and self.format == "torch":
                self.averaged = ([m.net for m in members], flips)
            else:
                opened = [open_runner(m, options.backend, self.device, self.amp,
                                      options.channels_last, self._stack, options.sw_batch_size)
                          for m in members]
                runners = [self.runner, *(runner for runner, _, _ in opened)]
                limits += [member_limit for _, _, member_limit in opened]
                self.runner = MeanLogits(runners, flips)
        self.exported_plan = None
        if self.format != "torch" and self.vista3d:
            if prompt.has_points:
                raise ConfigError(f"clicks (prompt.points) run with backend=torch only; the "
                                  f"{self.format} export holds VISTA3D's automatic mode")
            self.exported_plan = plan_exported(self.runner, prompt, model.known_ids)
        # The most windows per pass sw.batch_size=auto may choose (TensorRT engines' limit).
        self.batch_cap = min([MAX_AUTO_BATCH, *(n for n in limits if n is not None)])
        # SegResNet on CUDA: the accumulator and windows per pass are planned per case from the
        # free memory and one window's measured cost; elsewhere as configured.
        self.planned = self.device.type == "cuda" and not self.vista3d
        self.preprocess_device = self.device if self.planned and options.gpu_preprocessing \
            else torch.device("cpu")
        self.forward_bytes = 0
        if self.planned:
            window = torch.zeros((1, 1, *self.roi))
            self.forward_bytes = forward_bytes(self._predictor(self.runner), window, self.device)

    def __enter__(self) -> CasePredictor:
        """The predictor itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove temporary exports."""
        self.close()

    def close(self) -> None:
        """Remove temporary exports of the backend."""
        self._stack.close()

    def _predictor(self, predictor: Any) -> Any:
        """`predictor` under autocast when it is the torch network, float32 logits either way."""
        return self._autocast(predictor) if self.format == "torch" else predictor

    def vista3d_labels(self, prepared: PreparedCase, prompt: Prompt,
                       net: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """VISTA3D labels (as VISTA3D ids) on the model grid of `prepared` and their names, for
        `prompt`, run by `net` (default: the loaded network; a click session passes its cached
        one)."""
        o, data = self.options, prepared.data
        volume = data[IMAGE][None].as_tensor()
        spatial = tuple(int(s) for s in volume.shape[2:])
        padded, pad = pad_to_roi(volume, self.roi, 0.0, self.padding_mode)
        before = torch.tensor([b for b, _ in pad], dtype=torch.float64)
        points = None
        if prompt.has_points:
            points = to_model_grid(prompt.points, np.asarray(prepared.image.affine),
                                   np.asarray(data[IMAGE].affine), spatial)
        plan = self.exported_plan or plan_case(net or self.model.net, prompt,
                                               self.model.known_ids, points, before,
                                               padded.shape[2:], self.roi, o.overlap)
        if self.averaged is not None and self.exported_plan is None:
            nets, flips = self.averaged
            predictors = [plan.predictor, *(plan_case(
                member, prompt, self.model.known_ids, points, before, padded.shape[2:],
                self.roi, o.overlap).predictor for member in nets)]
            plan = replace(plan, predictor=MeanLogits(predictors, flips))
        result = sliding_window_predict(
            padded, self._predictor(plan.predictor), self.roi, o.overlap, mode=o.mode,
            sw_batch_size=1 if plan.with_windows else self.placement(padded.shape[2:]).batch_size,
            slab_axis=o.slab_axis,
            accum_dtype=o.accumulator, window_starts=plan.window_starts,
            with_windows=plan.with_windows,
            sw_device=self.device, device=self.device, output_device="cpu",
        )
        crop = tuple(slice(b, b + s) for (b, _), s in zip(pad, spatial, strict=True))
        channels = result.labels[crop]
        if plan.keep_clicked is not None:
            channels = keep_clicked_components(channels, *plan.keep_clicked)
        top = max(*plan.channel_ids, prompt.outside_value)
        dtype = label_dtype(top + 1)
        if len(plan.channel_ids) == 2:  # background and one structure: no lookup over the volume
            labels = channels.to(dtype) * plan.channel_ids[1]
        else:
            labels = torch.tensor(plan.channel_ids, dtype=dtype)[channels.long()]
        names = plan.names
        covered = window_coverage(plan.window_starts, padded.shape[2:], self.roi)
        if prompt.outside_value and covered is not None and not covered[crop].all():
            labels[~covered[crop]] = prompt.outside_value
            names = {**names, prompt.outside_value: OUTSIDE_NAME}
        return labels, names

    def placement(self, size: Sequence[int]) -> Placement:
        """Accumulator and windows per pass for a padded volume of `size`: planned from the free
        memory (logged) for SegResNet on CUDA, else rolling slabs and sw.batch_size (auto: 1)."""
        o = self.options
        if not self.planned:
            return fixed_placement(self.device, o.sw_batch_size)
        plan = plan_placement(free_memory(self.device), size, self.model.num_classes, self.roi,
                              o.accumulator or torch.float32, self.forward_bytes,
                              o.sw_batch_size, self.device, o.slab_axis, bool(self.keep),
                              self.batch_cap)
        log.info("placement: %s", plan.describe())
        return plan

    def _autocast(self, predictor: Any) -> Any:
        """`predictor` under autocast (CUDA float16 with AMP, CPU bfloat16 with cpu_bf16),
        returning float32 logits."""
        def run(*args: Any) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                return predictor(*args).float()
        return run

    def _sync(self) -> None:
        """Wait for queued CUDA work so stage timings are right."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _inverted(self, data: dict[str, Any], volume: torch.Tensor, nearest: bool
                  ) -> torch.Tensor:
        """`volume` (D, H, W) on the preprocessed grid mapped back to the loaded input's grid,
        as a float32 tensor."""
        image = data[IMAGE]  # on the preprocessing device, where the inversion runs too
        pred = MetaTensor(volume[None].float().to(image.device), meta=dict(image.meta),
                          applied_operations=list(image.applied_operations))
        inverter = Invertd(keys=PRED, transform=self.transforms, orig_keys=IMAGE,
                           nearest_interp=nearest)
        inverted = inverter({IMAGE: image, PRED: pred})[PRED]
        return (inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted)[0].cpu()

    def _invert(self, data: dict[str, Any], volume: torch.Tensor, nearest: bool) -> np.ndarray:
        """`volume` (D, H, W) on the preprocessed grid mapped back to the loaded input's grid."""
        return self._inverted(data, volume, nearest).numpy()

    def prepare(self, case: Case, prompt: Prompt | None = None,
                lap: Callable[[str], None] = lambda stage: None) -> PreparedCase:
        """Load `case` and preprocess it as in training (on the GPU when planned there with
        gpu_preprocessing; `lap` after each stage); ConfigError when a click of `prompt`
        (default: the run's) lies outside it."""
        image, header = load_case(case, self.options.series_uid)
        shape, affine = tuple(image.shape), np.asarray(image.affine, dtype=np.float64)
        check_points_inside(self.options.prompt if prompt is None else prompt, shape, case.path)
        if header is not None:
            affine = header.get_best_affine()
        skip = self.options.skip_air and not self.vista3d  # VISTA3D plans its own windows
        body = body_mask(image.as_tensor().numpy()) if skip else None
        lap("load")
        data = self.transforms({IMAGE: image.to(self.preprocess_device)})
        lap("preprocess")
        return PreparedCase(case, image, data, shape, affine, header, body)

    def input_labels(self, prepared: PreparedCase, grid_labels: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> np.ndarray:
        """Labels (D, H, W) on the model grid of `prepared` mapped back to its input's grid
        (nearest neighbour), in `dtype` (default: floats holding integers)."""
        labels = self._inverted(prepared.data, grid_labels, nearest=True).round().to(dtype)
        labels = labels.numpy()
        if labels.shape != prepared.shape:
            raise RuntimeError(f"{prepared.case.path}: inverted labels have shape {labels.shape}, "
                               f"input {prepared.shape}; the preprocessing is not invertible")
        return labels

    def segment(self, case: Case, lap: Callable[[str], None] = lambda stage: None
                ) -> Segmentation:
        """Load, preprocess and predict `case`; its labels on the input's grid. `lap(stage)` is
        called after each of the load, preprocess, inference and postprocess stages."""
        return self.segment_prepared(self.prepare(case, lap=lap), lap)

    def segment_prepared(self, prepared: PreparedCase,
                         lap: Callable[[str], None] = lambda stage: None) -> Segmentation:
        """Predict a prepared case; its labels on the input's grid (`lap` after the inference
        and postprocess stages)."""
        data = prepared.data
        o = self.options
        names: Sequence[str] | dict[int, str] = self.model.label_names
        probabilities: dict[int, np.ndarray] = {}
        windows: dict[str, int] = {}
        if self.vista3d:
            grid_labels, names = self.vista3d_labels(prepared, o.prompt)
        else:
            starts = None
            if prepared.body is not None:
                starts, total = body_window_starts(
                    prepared.body, np.asarray(prepared.image.affine),
                    np.asarray(data[IMAGE].affine), data[IMAGE].shape[1:], self.roi, o.overlap)
                windows = {"computed": len(starts) or total, "grid": total}
                log.info("%s: %d of %d windows hold the body (sw.skip_air)", prepared.case.name,
                         len(starts), total)
            size = [max(int(s), r) for s, r in zip(data[IMAGE].shape[1:], self.roi, strict=True)]
            plan = self.placement(size)
            result = sliding_window_predict(
                data[IMAGE][None], self._predictor(self.runner), self.roi, o.overlap, mode=o.mode,
                padding_mode=self.padding_mode, sw_batch_size=plan.batch_size,
                slab_axis=o.slab_axis, slab_planes=plan.slab_planes, keep_channels=self.keep,
                accum_dtype=o.accumulator, sw_device=self.device, device=plan.device,
                output_device="cpu", window_starts=starts or None,
            )
            grid_labels = result.labels
            probabilities = {c: self._invert(data, v, nearest=False)
                             for c, v in result.probabilities.items()}
        lap("inference")
        labels = self.input_labels(prepared, grid_labels)
        if self.largest_component:
            labels = keep_largest(labels, self.largest_component)
        lap("postprocess")
        return Segmentation(labels, prepared.affine, prepared.header, names, probabilities,
                            tuple(grid_labels.shape), windows)

    def _timer(self, times: dict[str, float]) -> Callable[[str], None]:
        """A `lap(stage)` that records into `times` the seconds since the previous lap."""
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            self._sync()
            now = time.perf_counter()
            times[stage] = round(now - clock, 3)
            clock = now

        return lap

    def load(self, case: Case) -> CaseRun:
        """Load and preprocess `case` (the load and preprocess stages of `predict`)."""
        run = CaseRun(case)
        run.prepared = self.prepare(case, lap=self._timer(run.times))
        return run

    def infer(self, run: CaseRun) -> CaseRun:
        """Predict a loaded case (inference and postprocess stages); its prepared data go."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        run.seg = self.segment_prepared(run.prepared, self._timer(run.times))
        run.prepared = None
        if self.device.type == "cuda":
            run.peak_gpu_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return run

    def save(self, run: CaseRun, folder: Path, overwrite: bool = False,
             record: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write a predicted case's outputs, and `record` (what wrote them), as folder `folder`
        (`swapped_folder`); its timing report."""
        case, seg, o = run.case, run.seg, self.options
        lap = self._timer(run.times)
        seg_error: Exception | None = None
        with swapped_folder(folder, replace=overwrite, own=LABELS_FILE) as tmp:
            write_case(tmp, seg.labels, seg.affine, seg.header, seg.names, o.masks,
                       seg.probabilities)
            if record is not None:
                write_record(tmp, record)
            if o.dicom_seg and case.kind == "dicom":
                try:
                    write_dicom_seg(tmp / SEG_FILE, seg.labels, seg.affine,
                                    series_datasets(case.path, o.series_uid), seg.names,
                                    f"ctseg {self.model.kind}")
                except Exception as err:  # the NIfTI outputs stand on their own: kept
                    seg_error = err
        if seg_error is not None:
            raise seg_failure(seg_error, case.path, folder) from seg_error
        lap("save")
        times = run.times
        times["total"] = round(sum(times[stage] for stage in STAGES), 3)
        report: dict[str, Any] = {
            "case": case.name, "input": str(case.path), "output": str(folder),
            "shape": list(seg.labels.shape), "model_grid": list(seg.model_grid),
            **({"windows": seg.windows} if seg.windows else {}),
            "seconds": times, "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if run.peak_gpu_mb is not None:
            report["peak_gpu_mb"] = run.peak_gpu_mb
        return report

    def predict(self, case: Case, folder: Path, overwrite: bool = False) -> dict[str, Any]:
        """Predict `case` and write its outputs to `folder` atomically; the timing report."""
        return self.save(self.infer(self.load(case)), folder, overwrite)
