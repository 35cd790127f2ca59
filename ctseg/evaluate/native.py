"""Evaluation of a Lightning module at native resolution: each subject predicted on its own CT grid
exactly as predict.py does (same preprocessing, sliding window and inversion), then scored with the
Dice and NSD of `python -m ctseg.evaluate` against its merged label map."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctseg.atomic import make_folder, save_nifti_atomic
from ctseg.data.layout import load_nifti, stored_labels
from ctseg.data.records import SUBJECT
from ctseg.data.transforms import ANNOTATED, DATASET, IMAGE, LABEL, PipelineConfig
from ctseg.errors import DatasetError
from ctseg.evaluate.metrics import case_rows, mapped, names_lookup
from ctseg.inference.inputs import Case
from ctseg.inference.outputs import nifti_like
from ctseg.inference.pipeline import CasePredictor, PredictOptions
from ctseg.label_space import annotated_channels
from ctseg.labels import label_map_dtype, label_table
from ctseg.models.base import SegmentationModule

log = logging.getLogger(__name__)

# Kept label maps of native evaluation (`<evaluation folder>/predictions/<case>.nii.gz`) and,
# beside them, case -> its ground-truth label map (for choosing post-processing).
PREDICTIONS = "predictions"
GROUND_TRUTH = "ground_truth.json"


def record_case(record: Mapping[str, Any]) -> str:
    """The case name of a DataModule record: its subject id, else its CT's folder name."""
    return str(record.get(SUBJECT) or Path(record[IMAGE]).parent.name)


def score_records(module: SegmentationModule, pipeline: PipelineConfig,
                  records: Iterable[Mapping[str, Any]], tolerance: float,
                  device: torch.device | str = "cpu", predictions: Path | None = None
                  ) -> list[dict[str, Any]]:
    """Per case and class Dice and NSD rows (as `python -m ctseg.evaluate` writes them) of the
    module's native-resolution predictions of `records` (dicts with image, label, subject and
    optionally dataset and the annotated flags: only those classes are scored);
    with `predictions`, each label map (in the data's class indices) is kept there as
    `<case>.nii.gz`."""
    names: Sequence[str] = module.label_names
    options = PredictOptions(device=str(device), masks=False)
    rows: list[dict[str, Any]] = []
    model = module.inference_model(pipeline)  # a copy: prediction never touches the trained net
    with CasePredictor(replace(model, net=copy.deepcopy(model.net).eval()), options) as predictor:
        for record in records:
            image, label = Path(record[IMAGE]), Path(record[LABEL])
            case = record_case(record)
            seg = predictor.segment(Case(case, image, "nifti"))
            # VISTA3D predicts its own ids (named in seg.names): back to the data's classes
            pred = mapped(seg.labels.astype(np.int32),
                          names_lookup(label_table(seg.names), names, image), image)
            gt_img = load_nifti(label, "prepare the dataset again")
            gt = stored_labels(gt_img, label)
            gt = module.scored_labels(torch.from_numpy(gt)).numpy()  # as the module's test Dice
            if pred.shape != gt.shape:
                raise DatasetError(label, f"grid {gt.shape} differs from its CT {image} "
                                   f"({pred.shape}); prepare the dataset again")
            spacing = tuple(float(s) for s in gt_img.header.get_zooms()[:3])
            flags = record.get(ANNOTATED)  # partially labelled: its dataset's classes only
            classes = None if flags is None else annotated_channels(flags.tolist())
            rows += case_rows(case, pred, gt, spacing, names, tolerance, classes,
                              str(record.get(DATASET) or ""))
            if predictions is not None:
                save_nifti_atomic(nifti_like(pred.astype(label_map_dtype(len(names))),
                                             seg.affine, seg.header),
                                  make_folder(predictions) / f"{case}.nii.gz")
            log.info("native evaluation: %s scored on its %s grid", case, "x".join(
                str(n) for n in gt.shape))
    return rows
