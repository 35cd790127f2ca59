"""Ensembles and mirroring test-time augmentation for prediction: several models (e.g. the folds
of a cross-validation) and/or the 2^n mirrorings of each window, their logits averaged window by
window (`MeanLogits`), as nnU-Net v2 averages folds and mirrorings (`predict_from_raw_data`,
`_internal_maybe_mirror_and_predict`; TotalSegmentator predicts through it). The mean is a logit,
which is what one model's window gives, so the sliding-window blend, its argmax and its memory
bound are those of one model; summed in order and divided once, identical members give one
model's logits bit for bit ((l + l) / 2 == l), so `ckpt=[a,a]` predicts exactly what `a` does (a
log of mean softmax, argmax-equal in exact arithmetic, rounds differently and moved voxels)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from ctseg.errors import ConfigError
from ctseg.models.loaded_model import LoadedModel

TTA_MODES = ("mirror",)
SPATIAL = 3
WindowRunner = Callable[[Tensor], Tensor]


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial `axes` (0..2) as tensor dims of (B, C, D, H, W) windows, the
    identity first: 2^len(axes) flips (nnU-Net mirrors all three axes: 8)."""
    dims = sorted({int(a) for a in axes})
    if not dims or any(a not in range(SPATIAL) for a in dims):
        raise ConfigError(f"tta_axes={list(axes)}: spatial axes among 0, 1, 2")
    dims = [a + 2 for a in dims]
    return [combo for n in range(len(dims) + 1) for combo in itertools.combinations(dims, n)]


class MeanLogits:
    """A window runner: the mean float32 logits of `runners` x `flips` (mirrored outputs
    mirrored back), summed in place in that order, then divided by their count (nnU-Net v2's
    folds and mirrorings). VISTA3D's constant 0 background channel stays 0, so its argmax rule
    holds on the mean: background where no mean logit exceeds 0. Memory: one window output
    besides the running sum (a mirrored pass adds its flipped copy)."""

    def __init__(self, runners: Sequence[WindowRunner], flips: Sequence[tuple[int, ...]] = ((),)
                 ) -> None:
        """Average `runners`, each over the mirror `flips` of the windows."""
        self.runners, self.flips = list(runners), list(flips)
        self.count = len(self.runners) * len(self.flips)

    def __call__(self, windows: Tensor) -> Tensor:
        """(B, C, D, H, W) mean logits of (B, 1, D, H, W) windows (the runners return a new
        output per call, so the first one holds the sum)."""
        total: Tensor | None = None
        for run in self.runners:
            for dims in self.flips:
                out = run(windows.flip(dims) if dims else windows).float()
                out = out.flip(dims) if dims else out
                if total is None:
                    total = out
                else:
                    total.add_(out)
                del out
        assert total is not None
        return total.div_(self.count)


def check_members(models: Sequence[LoadedModel], sources: Sequence[str]) -> None:
    """ConfigError unless the ensemble's models agree on kind, classes, preprocessing and window
    (the first is the reference)."""
    first = models[0]
    for model, source in zip(models[1:], sources[1:], strict=True):
        for what, mine, theirs in (("architecture", model.kind, first.kind),
                                   ("classes", model.label_names, first.label_names),
                                   ("class ids", model.known_ids, first.known_ids),
                                   ("preprocessing", model.pipeline, first.pipeline),
                                   ("window", model.roi_size, first.roi_size)):
            if mine != theirs:
                raise ConfigError(f"ckpt=[...]: {source} has other {what} than {sources[0]} "
                                  f"({mine} vs {theirs}); an ensemble averages models of one "
                                  "class set, preprocessing and window")


def run_checkpoints(folder: Path) -> list[Path]:
    """The best checkpoint (ModelCheckpoint's `epoch_*.ckpt`, else `last.ckpt`) of every run
    under `folder` (a cross-validation multirun: one per fold), sorted by run folder."""
    found = []
    for checkpoints in sorted(folder.rglob("checkpoints")):
        best = sorted(checkpoints.glob("epoch_*.ckpt"))
        chosen = best[-1] if best else checkpoints / "last.ckpt"
        if chosen.is_file():
            found.append(chosen)
    if not found:
        raise ConfigError(f"ckpt={folder}: no run with checkpoints/epoch_*.ckpt or last.ckpt "
                          "below it; give a checkpoint, a list of them, or a multirun folder")
    return found
