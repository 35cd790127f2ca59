"""Figures written as files: matplotlib's file backend (no display needed) and atomic PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ctseg.atomic import write_atomic


def save_png(figure: plt.Figure, path: Path) -> None:
    """Lay `figure` out, write it as a PNG atomically and close it."""
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), suffix=".png")
    plt.close(figure)
