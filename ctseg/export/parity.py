"""Parity of an export with the torch network: largest absolute logit difference and argmax
agreement on one window, checked against thresholds and written as JSON beside the export."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from ctseg.atomic import write_atomic
from ctseg.config import CONFIG_DIR
from ctseg.errors import CtsegError
from ctseg.export.runtime import Runner

log = logging.getLogger(__name__)


class ParityError(CtsegError, RuntimeError):
    """An export whose logits or labels differ from the torch network beyond the thresholds."""


@dataclass(frozen=True)
class Thresholds:
    """Largest allowed absolute logit difference and smallest argmax agreement (0..1)."""

    max_abs_diff: float = 1e-3
    min_agreement: float = 0.999


# Per format, from the config tree (conf/parity/default.yaml, the one place they are written).
DEFAULT_THRESHOLDS = {
    fmt: Thresholds(**{k: float(v) for k, v in entry.items()})
    for fmt, entry in OmegaConf.to_container(
        OmegaConf.load(CONFIG_DIR / "parity" / "default.yaml")).items()
}


def thresholds_for(fmt: str, table: Mapping[str, Any] | None = None) -> Thresholds:
    """The thresholds of `fmt`: DEFAULT_THRESHOLDS overridden by a {format: {max_abs_diff,
    min_agreement}} table."""
    entry = {**asdict(DEFAULT_THRESHOLDS.get(fmt, Thresholds())), **((table or {}).get(fmt) or {})}
    return Thresholds(**{k: float(v) for k, v in entry.items()})


def parity_path(export_file: Path) -> Path:
    """Where the parity report of `export_file` is written: beside it, `<file>.parity.json`."""
    return export_file.with_name(export_file.name + ".parity.json")


def measure(reference: Tensor, runner: Runner, window: Tensor) -> dict[str, float]:
    """Max absolute logit difference and argmax agreement of `runner` against `reference`
    logits (the torch network's output for `window`)."""
    logits = runner(window).float().to(reference.device)
    if logits.shape != reference.shape:
        raise ParityError(f"the export returns logits of shape {tuple(logits.shape)} where the "
                          f"torch network returns {tuple(reference.shape)}")
    agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    return {"max_abs_diff": (logits - reference).abs().max().item(), "argmax_agreement": agreement}


def check(fmt: str, export_file: Path, reference: Tensor, runner: Runner, window: Tensor,
          limits: Thresholds) -> dict[str, Any]:
    """Measure parity, write it beside `export_file`, log it; ParityError naming the format and
    figures when a threshold is broken (the report is written either way)."""
    figures = measure(reference, runner, window)
    passed = (figures["max_abs_diff"] <= limits.max_abs_diff
              and figures["argmax_agreement"] >= limits.min_agreement)
    report = {"format": fmt, "file": export_file.name, "window": list(window.shape),
              **figures, "thresholds": asdict(limits), "passed": passed}
    text = json.dumps(report, indent=2) + "\n"
    write_atomic(parity_path(export_file), lambda tmp: tmp.write_text(text))
    log.info("%s parity: max |logit diff| %.3g, argmax agreement %.5f (%s)", fmt,
             figures["max_abs_diff"], figures["argmax_agreement"],
             "passed" if passed else "FAILED")
    if not passed:
        raise ParityError(
            f"{fmt} export {export_file.name} fails parity: max |logit diff| "
            f"{figures['max_abs_diff']:.3g} (limit {limits.max_abs_diff:.3g}), argmax agreement "
            f"{figures['argmax_agreement']:.5f} (limit {limits.min_agreement:.5f}); the "
            "previous export, if any, is kept")
    return report


@torch.no_grad()
def reference_logits(net: torch.nn.Module, window: Tensor) -> Tensor:
    """The torch network's float32 logits for `window` (no autocast)."""
    return net.eval()(window).float()
