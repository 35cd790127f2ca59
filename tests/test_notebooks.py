"""The notebooks in notebooks/ are stored without outputs and run top to bottom in a fresh python3
kernel, showing what each one is for; their shell commands run the kernel's own interpreter."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import matplotlib.image as mpimg
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# What each notebook's outputs must show (regular expressions over its text outputs).
EXPECTED = {
    "01_quickstart.ipynb": [
        r"epochs: 12 steps: 84",
        r"'test/native/mean_case_dice': 0\.\d+",
        r"\d+ predicted, 0 skipped, 0 failed",
        r"3 cases; NSD at 3 mm; mean over classes: Dice 0\.\d+, NSD 0\.\d+",
        r"written: .*prediction\.png \([1-9]\d* structures in the slices shown",
    ],
    "02_dataset.ipynb": [
        r"totalseg_mini: 1 subjects, 104 structure masks per subject",
        r"totalseg_mini: \{'train': 0, 'val': 0, 'test': 1\}",
        r"phantoms: \{'train': 6, 'val': 1, 'test': 1\}",
        r"\d+ of 104 classes present in the crop; largest:\s+liver",
        r"[1-9]\d* structures in the three slices",
    ],
    "03_compare_runs.ipynb": [
        r"\['0', '1'\]",
        r"\| rank \| run \| best val/mean_dice",
        r"2 runs; written .*compare\.md",
        r"runs compared: 2",
    ],
    "04_cross_validation.ipynb": [
        r"\['0', '1'\] \['0', '1'\]",
        r"cross-validation: 34 out-of-fold cases of 2 folds",
        # the text: over the 34 out-of-fold phantoms paired by subject id, p below one in a
        # million, several structures significant after Holm's correction
        r"lr=0\.001 vs the best, model\.optimizer\.lr=0\.003: overall Dice difference "
        r"-0\.\d+ \(Wilcoxon p = \d(\.\d+)?e-(0[6-9]|[1-9]\d), 34 out-of-fold cases paired by "
        r"case id; 2 and 2 runs\); structures that differ \(Holm-adjusted p < 0\.05\): "
        r"\w+, \w+, \w+",
        r"4 runs; statistics of 2 configs over 34 out-of-fold cases each; written ",
        r"configs compared: 2",
        r"6 predicted, 0 skipped, 0 failed",
    ],
}
# The figures a notebook's text states, each as (where the text states it, where the outputs show
# it, tolerance): regular expressions whose one group is the number. The stated figure is read from
# the text itself, so the two cannot drift apart. Every decimal in a notebook's text is one of
# these groups or the tolerance, stated as "within <tolerance>" (test_every_stated_figure_is_held).
DICE = r"NSD at 3 mm; mean over classes: Dice (0\.\d+)"
FIGURES = {
    "01_quickstart.ipynb": [
        (r"mean Dice about (0\.\d+) on the three test phantoms", rf"3 cases; {DICE}", 0.05),
    ],
    "03_compare_runs.ipynb": [
        (r"validation Dice of about (0\.\d+)", r"best run: .* best val/mean_dice (0\.\d+)", 0.05),
    ],
    "04_cross_validation.ipynb": [
        (r"mean Dice of about (0\.\d+) at lr 3e-3",
         rf"34 cases; {DICE}.*\nwritten: \S*lr_3e-3/cv_evaluation", 0.05),
        (r"about (0\.\d+) at lr 1e-3 over the 34 phantoms",
         rf"34 cases; {DICE}.*\nwritten: \S*lr_1e-3/cv_evaluation", 0.05),
        (r"here about (0\.\d+) at lr 3e-3",
         r"\| model\.optimizer\.lr=0\.003 \| 2 \| 34 \| (0\.\d+)", 0.05),
        (r"here about 0\.\d+ at lr 3e-3 and (0\.\d+) at lr 1e-3",
         r"\| model\.optimizer\.lr=0\.001 \| 2 \| 34 \| (0\.\d+)", 0.05),
        (r"scores lower by about (0\.\d+)", r"overall Dice difference -(0\.\d+)", 0.05),
        (r"about (0\.\d+) with fold 0 alone", rf"single:\s*6 cases; {DICE}", 0.05),
        (r"about (0\.\d+) with the ensemble of both folds", rf"ensemble:\s*6 cases; {DICE}",
         0.05),
        (r"about (0\.\d+) with the ensemble and mirroring", rf"mirrored:\s*6 cases; {DICE}",
         0.05),
    ],
}


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """All stream and plain-text results of the executed notebook, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def markdown_text(notebook: nbformat.NotebookNode) -> str:
    """The text of the notebook's Markdown cells, joined, every run of white space one space."""
    return " ".join(" ".join(cell.source.split()) for cell in notebook.cells
                    if cell.cell_type == "markdown")


def stated(text: str, pattern: str) -> float:
    """The number of the one group of `pattern` in `text`; fails when the text does not have it."""
    match = re.search(pattern, text)
    assert match, f"no text matches {pattern!r}"
    return float(match[1])


def images(notebook: nbformat.NotebookNode) -> list[np.ndarray]:
    """The PNG images the executed notebook displayed, as RGB(A) arrays."""
    return [mpimg.imread(io.BytesIO(base64.b64decode(output["data"]["image/png"])), format="png")
            for cell in notebook.cells for output in cell.get("outputs", [])
            if "image/png" in output.get("data", {})]


def foreign_python_first(folder: Path) -> dict[str, str]:
    """An environment whose PATH finds another `python` first, as a kernel of a virtual environment
    that is not activated sees it: stand-ins for python and python3 in `folder` that log each call
    to folder/calls and fail."""
    for name in ("python", "python3"):
        stand_in = folder / name
        stand_in.write_text('#!/bin/sh\necho "$0 $*" >> "$(dirname "$0")/calls"\nexit 1\n')
        stand_in.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_every_notebook_is_checked():
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_stated_figure_is_held(path: Path):
    text = markdown_text(nbformat.read(path, as_version=4))
    held = set()
    for narrative, _, _ in FIGURES.get(path.name, []):
        stated(text, narrative)
        held |= {match.span(1) for match in re.finditer(narrative, text)}
    tolerances = {tolerance for _, _, tolerance in FIGURES.get(path.name, [])}
    for match in re.finditer(r"within (\d*\.\d+)", text):
        assert {float(match[1])} == tolerances, f"{path.name}: {match[0]!r}, held {tolerances}"
        held.add(match.span(1))
    loose = [m[0] for m in re.finditer(r"\b\d*\.\d+\b", text) if m.span() not in held]
    assert not loose, f"{path.name} states figures that no entry of FIGURES holds: {loose}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    env = foreign_python_first(tmp_path)
    try:  # jupyter_client starts the kernel with sys.executable whatever PATH says
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute(env=env)
    finally:
        calls = tmp_path / "calls"
        assert not calls.exists(), (f"{path.name} ran the python first on PATH, not the "
                                    f"kernel's interpreter:\n{calls.read_text()}")
    text = outputs_text(notebook)
    for pattern in EXPECTED[path.name]:
        assert re.search(pattern, text), f"{path.name}: no output matches {pattern!r}"
    for narrative, output, tolerance in FIGURES.get(path.name, []):
        claim, value = stated(markdown_text(notebook), narrative), stated(text, output)
        assert abs(value - claim) <= tolerance, (f"{path.name}: the text states {claim}, the "
                                                 f"outputs show {value} ({output!r})")
    shown = images(notebook)
    assert shown, f"{path.name} displays no figure"
    for image in shown:
        rgb = image[..., :3]
        assert rgb.std() > 0.05, f"{path.name}: a blank figure"
