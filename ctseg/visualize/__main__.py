"""`python -m ctseg.visualize ct=<nii> labels=<nii> out=<png>`: axial, coronal and sagittal slices
through the centre of the labelled structures, in the colour tables' colours, with a legend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ctseg.config import CONFIG_DIR
from ctseg.errors import ConfigError, run_cli
from ctseg.figures import save_png
from ctseg.inference.outputs import LABELS_JSON, read_label_json
from ctseg.labels import VERSIONS, Names, label_names
from ctseg.visualize.overlay import DEFAULT_ALPHA, DEFAULT_WINDOW, MAX_LEGEND, overlay_figure

log = logging.getLogger(__name__)

REQUIRED = ("ct", "labels", "out")


def structure_names(labels: Path, version: str | None) -> tuple[Names, str]:
    """Names of the label values and where they come from: `version`'s table, else the
    labels.json that predict.py wrote beside the label map, else v1."""
    if version is not None:
        if version not in VERSIONS:
            raise ConfigError(f"version={version}: choose one of {', '.join(VERSIONS)} (or null "
                              f"for the {LABELS_JSON} beside the label map)")
        return label_names(version), f"TotalSegmentator {version}"
    table = labels.parent / LABELS_JSON
    if table.is_file():
        return read_label_json(table, "fix it, or pass version=v1|v2"), str(table)
    return label_names("v1"), "TotalSegmentator v1 (no labels.json beside the label map)"


def visualize(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Write the overlay PNG of `cfg` (ct, labels, out, version, window, alpha, max_legend); what
    was shown."""
    missing = [key for key in REQUIRED if (OmegaConf.is_missing(cfg, key)
               if isinstance(cfg, DictConfig) else cfg.get(key) is None)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: python -m ctseg.visualize "
                          "ct=<ct.nii.gz> labels=<label map .nii.gz> out=<overlay.png>")
    ct, labels, out = (Path(str(cfg[key])) for key in REQUIRED)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"out={out}: the overlay is a PNG; give a file name ending in .png")
    version = cfg.get("version")
    names, source = structure_names(labels, None if version is None else str(version))
    figure, shown = overlay_figure(ct, labels, names,
                                   window=cfg.get("window", DEFAULT_WINDOW),
                                   alpha=float(cfg.get("alpha", DEFAULT_ALPHA)),
                                   max_legend=int(cfg.get("max_legend", MAX_LEGEND)))
    if not shown:
        log.warning("%s has no labelled voxel: the overlay shows the CT's centre slices only",
                    labels)
    save_png(figure, out)
    return {"out": str(out), "names": source, "shown": len(shown)}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="visualize")
def main(cfg: DictConfig) -> None:
    """Write the overlay and say where it went."""
    result = visualize(cfg)
    print(f"written: {result['out']} ({result['shown']} structures in the slices shown; names: "
          f"{result['names']})")


def cli() -> None:
    """Console entry point (`ctseg-visualize`, `python -m ctseg.visualize`)."""
    run_cli(main, "python -m ctseg.visualize")


if __name__ == "__main__":
    cli()
