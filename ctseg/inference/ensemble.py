"""Ensembles and mirroring test-time augmentation for prediction: several models (e.g. the folds
of a cross-validation) and/or the 2^n mirrorings of each window, their probabilities averaged
window by window: SegResNet's softmax (`MeanProbabilities`: the log of the mean) and VISTA3D's
per-class sigmoid (`MeanSigmoids`: the logit of the mean). The window functions return what one
model's would, so the sliding-window blend, its argmax and its memory bound are those of one
model, and for one model the labels are the same."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
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


CHUNK = 8  # slices (first spatial axis) per in-place step: temporaries stay a slab of a window


def _flipped_back(run: WindowRunner, windows: Tensor, dims: tuple[int, ...]) -> Tensor:
    """`run` on `windows` mirrored along `dims`, its float output mirrored back; the tensor is
    the caller's to edit (runners return a new output per call)."""
    out = run(windows.flip(dims) if dims else windows).float()
    return out.flip(dims) if dims else out


def _chunks(*tensors: Tensor) -> zip:
    """The tensors split alike into CHUNK-slice views along the first spatial axis (used inside
    helpers, so that no view outlives its call and keeps a freed window's storage alive)."""
    return zip(*(t.split(CHUNK, dim=2) for t in tensors), strict=True)


def _log_softmax_(logits: Tensor) -> Tensor:
    """`logits` turned into log-softmax over channels in place."""
    for (part,) in _chunks(logits):
        part.sub_(torch.logsumexp(part, dim=1, keepdim=True))
    return logits


def _start_sigmoid_sums(logits: Tensor, log_p_sum: Tensor) -> None:
    """Write log(sigmoid) of `logits` into `log_p_sum` and turn `logits` into log(1 - sigmoid)."""
    for log_p, logit in _chunks(log_p_sum, logits):
        log_p.copy_(torch.nn.functional.logsigmoid(logit))
        logit.neg_().add_(log_p)  # log(1 - p) = log(p) - logit


def _add_sigmoid_sums(logits: Tensor, log_p_sum: Tensor, log_q_sum: Tensor) -> None:
    """Add sigmoid(`logits`) and its complement to the log sums (`logits` is overwritten)."""
    for p_sum, q_sum, logit in _chunks(log_p_sum, log_q_sum, logits):
        log_p = torch.nn.functional.logsigmoid(logit)
        torch.logaddexp(p_sum, log_p, out=p_sum)
        torch.logaddexp(q_sum, logit.neg_().add_(log_p), out=q_sum)


class MeanProbabilities:
    """A window runner: log of the mean softmax over `runners` x `flips`, computed in place
    (one window output besides the running total; a mirrored one adds its copy)."""

    def __init__(self, runners: Sequence[WindowRunner], flips: Sequence[tuple[int, ...]] = ((),)
                 ) -> None:
        """Average `runners`, each over the mirror `flips` of the windows."""
        self.runners, self.flips = list(runners), list(flips)
        self.log_count = math.log(len(self.runners) * len(self.flips))

    def __call__(self, windows: Tensor) -> Tensor:
        """(B, C, D, H, W) log mean probabilities of (B, 1, D, H, W) windows."""
        total: Tensor | None = None
        for run in self.runners:
            for dims in self.flips:
                log_p = _log_softmax_(_flipped_back(run, windows, dims))
                if total is None:
                    total = log_p
                else:
                    torch.logaddexp(total, log_p, out=total)
                del log_p
        assert total is not None
        return total.sub_(self.log_count)


class MeanSigmoids:
    """A window runner for VISTA3D outputs (background channel 0, then one logit per class):
    the logit of the mean sigmoid per class over `runners` x `flips`, background 0, so argmax
    stays VISTA3D's rule (background where no mean probability exceeds 0.5). Accumulated in
    log space in place: the first output holds log(1 - p), one more window log(p)."""

    def __init__(self, runners: Sequence[WindowRunner], flips: Sequence[tuple[int, ...]] = ((),)
                 ) -> None:
        """Average `runners`, each over the mirror `flips` of the windows."""
        self.runners, self.flips = list(runners), list(flips)

    def __call__(self, windows: Tensor) -> Tensor:
        """(B, 1 + P, D, H, W) logits of the mean class probabilities of (B, 1, ...) windows."""
        first: Tensor | None = None  # its channels 1: hold the log of the summed complements
        inside: Tensor | None = None  # log of the summed probabilities
        for run in self.runners:
            for dims in self.flips:
                out = _flipped_back(run, windows, dims)
                if first is None or inside is None:
                    first, inside = out, torch.empty_like(out[:, 1:])
                    _start_sigmoid_sums(first[:, 1:], inside)
                else:
                    _add_sigmoid_sums(out[:, 1:], inside, first[:, 1:])
                del out
        assert first is not None and inside is not None
        first[:, 1:].neg_().add_(inside)  # log(sum p) - log(sum q): the counts cancel
        first[:, :1] = 0.0
        return first


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
