"""Batch prediction behind `predict.py`: every case of the input, skip or overwrite existing
outputs, keep going after a failed case and report failures at the end."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.progress import Progress

from ctseg.atomic import OutputExists, remove_leftovers
from ctseg.config import plain
from ctseg.errors import ConfigError, CtsegError, WorkDone, user_message
from ctseg.inference.ensemble import check_members, run_checkpoints
from ctseg.inference.inputs import Case, discover_cases
from ctseg.inference.outputs import TIMING_FILE, write_json
from ctseg.inference.overlap import background, done, failed
from ctseg.inference.pipeline import STAGES, CasePredictor, CaseRun, PredictOptions, resolve_device
from ctseg.inference.placement import AUTO
from ctseg.inference.postprocess import POSTPROCESSING_FILE, read_choice
from ctseg.inference.prompts import parse_prompt
from ctseg.inference.record import check_done, prediction_record
from ctseg.models.loading import EXPORT_MANIFEST, load_model

log = logging.getLogger(__name__)


class CasesFailed(CtsegError, WorkDone):
    """Some cases of a batch failed (each named in the log); the others were written."""


def _number(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind` (float or int); ConfigError naming `key` when it is not a number."""
    if value is None or isinstance(value, bool):
        raise ConfigError(f"{key}={value}: expected a number")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value}: expected a number") from None
    if kind is int and number != value and str(number) != str(value):
        raise ConfigError(f"{key}={value}: expected a whole number")
    return number


def options_from(cfg: Mapping[str, Any]) -> PredictOptions:
    """PredictOptions from the `sw`, device and output keys of conf/predict.yaml; a key left out
    takes PredictOptions' default (the same as predict.yaml's). A bad value is a ConfigError
    naming its key, before any model is loaded."""
    d = PredictOptions()
    sw = plain(cfg.get("sw")) or {}
    slab_axis = sw.get("slab_axis", d.slab_axis)
    batch = sw.get("batch_size", d.sw_batch_size)
    return PredictOptions(
        roi_size=sw.get("roi_size", d.roi_size),
        overlap=_number("sw.overlap", sw.get("overlap", d.overlap), float),
        mode=str(sw.get("mode", d.mode)), padding_mode=sw.get("padding_mode", d.padding_mode),
        sw_batch_size=batch if batch == AUTO else _number("sw.batch_size", batch, int),
        slab_axis=None if slab_axis is None else _number("sw.slab_axis", slab_axis, int),
        accum_dtype=sw.get("accum_dtype", d.accum_dtype),
        skip_air=bool(sw.get("skip_air", d.skip_air)),
        device=str(cfg.get("device", d.device)), amp=bool(cfg.get("amp", d.amp)),
        gpu_preprocessing=bool(cfg.get("gpu_preprocessing", d.gpu_preprocessing)),
        cpu_bf16=bool(cfg.get("cpu_bf16", d.cpu_bf16)),
        backend=str(cfg.get("backend") or d.backend),
        channels_last=bool(cfg.get("channels_last", d.channels_last)),
        masks=bool(cfg.get("masks", d.masks)),
        probabilities=tuple(plain(cfg.get("probabilities")) or d.probabilities),
        series_uid=cfg.get("series_uid", d.series_uid),
        dicom_seg=bool(cfg.get("dicom_seg", d.dicom_seg)),
        prompt=parse_prompt(plain(cfg.get("prompt"))),
        tta=cfg.get("tta", d.tta),
        tta_axes=tuple(plain(cfg.get("tta_axes")) or d.tta_axes),
    )


def checkpoint_sources(ckpt: Any) -> list[str]:
    """The models `ckpt` names: one path, a list of them (an ensemble), or a multirun folder
    (each run's best checkpoint: a cross-validation's fold ensemble)."""
    if isinstance(ckpt, list | tuple):
        if not ckpt:
            raise ConfigError("ckpt=[]: name at least one checkpoint")
        return [str(c) for c in ckpt]
    path = Path(str(ckpt))
    if path.is_dir() and not (path / EXPORT_MANIFEST).is_file() and not \
            (path / "checkpoints").is_dir() and any(path.rglob("checkpoints")):
        return [str(p) for p in run_checkpoints(path)]
    return [str(ckpt)]


def failure_message(err: BaseException) -> str:
    """The message of a failed case: a CtsegError's own (it says what to do), else
    `<ExceptionType>: <message>` (the message alone can be empty or a bare `''`)."""
    message = user_message(err)
    if message is not None:
        return message
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _summary_line(report: Mapping[str, Any]) -> str:
    """One log line with the stage timings and peak memory of a case."""
    times = report["seconds"]
    stages = ", ".join(f"{s} {times[s]:.2f}s" for s in STAGES)
    return (f"{report['case']}: {stages}, total {times['total']:.2f}s, peak RSS "
            f"{report['peak_rss_mb']:.0f} MiB")


def run(cfg: DictConfig | Mapping[str, Any]) -> int:
    """Predict every case of `cfg.input` into `cfg.output`; exit status 0. Failed cases are
    logged as they happen and, once the others are written, raised as one CasesFailed."""
    output = Path(str(cfg["output"]))
    options = options_from(cfg)
    resolve_device(options.device)  # device=cuda without CUDA: said before the model loads
    cases = discover_cases(str(cfg["input"]))
    nifti = [c.name for c in cases if c.kind == "nifti"]
    if options.dicom_seg and nifti:
        log.warning("dicom_seg=true: a DICOM SEG is written for DICOM series inputs only, not for "
                    "the NIfTI case(s) %s", ", ".join(nifti))
    mode = str(cfg.get("postprocessing", "auto"))
    if mode not in ("auto", "none"):
        raise ConfigError(f"postprocessing={mode}: choose auto or none")
    sources = checkpoint_sources(plain(cfg["ckpt"]))
    models = [load_model(source, plain(cfg.get("model")) or {}, plain(cfg.get("data")) or {})
              for source in sources]
    check_members(models, sources)
    choice = Path(sources[0]).parent / POSTPROCESSING_FILE
    if mode == "auto" and choice.is_file() and \
            models[0].kind == "segresnet":
        options = replace(options, largest_component=tuple(read_choice(choice)))
        log.info("post-processing from %s: the largest component of %d structures",
                 choice, len(options.largest_component))
    if len(models) > 1:
        log.info("ensemble of %d models: %s", len(models), ", ".join(sources))
    overwrite = bool(cfg.get("overwrite", False))
    removed = remove_leftovers(output)
    if removed:
        log.info("cleaned up %d temporaries of an interrupted run in %s", len(removed), output)
    written_by = prediction_record(sources, models, options)
    skip = set() if overwrite else set(check_done(output, [c.name for c in cases], written_by))
    reports, skipped, failures = [], [], []

    def write_timing() -> None:
        write_json(output / TIMING_FILE, {"cases": reports, "skipped": skipped,
                                          "failed": failures})

    def load_unless_done(case: Case) -> CaseRun | None:
        """`case` loaded, or None when the same model and settings wrote it (overwrite off)."""
        return None if case.name in skip else predictor.load(case)

    def record(case: Case, outcome: Future) -> None:
        """Log and keep what became of `case`: its report, a skip, or its failure."""
        folder = output / case.name
        try:
            report = outcome.result()
            if report is None:
                log.info("%s: written by the same model and settings, skipped (overwrite=true "
                         "to redo)", folder)
                skipped.append(case.name)
            else:
                log.info(_summary_line(report))
                reports.append(report)
        except OutputExists:
            log.info("%s: written by another process meanwhile, kept", folder)
            skipped.append(case.name)
        except Exception as err:
            message = failure_message(err)
            log.error("%s failed: %s", case.path, message)
            # the console keeps one line per case; the log file gets the traceback
            log.debug("%s: traceback of the failure", case.path, exc_info=True)
            failures.append({"case": case.name, "input": str(case.path), "error": message})
        progress.advance(task)
        write_timing()  # after each case, so a killed run keeps the timings so far

    # overlap_io: the next case is read (and preprocessed) and the previous one written in
    # threads while this one computes; without it each step runs in turn, here.
    overlap = bool(cfg.get("overlap_io", True))
    with CasePredictor(models[0], options, members=models[1:]) as predictor, \
            Progress(disable=not cfg.get("progress", True)) as progress, \
            background(overlap, "ctseg-read") as reader, \
            background(overlap, "ctseg-write") as writer:
        task = progress.add_task("predict", total=len(cases))
        writes: deque[tuple[Case, Future]] = deque()
        loading = reader.submit(load_unless_done, cases[0]) if cases else None
        for index, case in enumerate(cases):
            progress.update(task, description=case.name)
            current = loading
            if index + 1 < len(cases):
                loading = reader.submit(load_unless_done, cases[index + 1])
            try:
                loaded = current.result()
                saving = done(None) if loaded is None else writer.submit(
                    predictor.save, predictor.infer(loaded), output / case.name, overwrite,
                    written_by)
            except Exception as err:
                saving = failed(err)
            writes.append((case, saving))
            while len(writes) > overlap:  # with overlap, the last write goes on meanwhile
                record(*writes.popleft())
        while writes:
            record(*writes.popleft())
    log.info("%d predicted, %d skipped, %d failed; timings in %s", len(reports), len(skipped),
             len(failures), output / TIMING_FILE)
    if failures:
        first = failures[0]["error"]
        if len(cases) == 1:
            raise CasesFailed(first)
        more = f" and {len(failures) - 1} more (listed above)" if len(failures) > 1 else ""
        raise CasesFailed(f"{len(failures)} of {len(cases)} cases failed: {first}{more}; the "
                          f"others are written to {output}; fix or remove the failed inputs and "
                          "run the same command again (finished cases are kept)")
    return 0
