"""`python -m ctseg.evaluate.interactive ckpt=<VISTA3D .ckpt or model.pt> gt=<dataset>`: a VISTA3D
model measured as the literature measures interactive models, by Dice after each simulated click.

For each case and structure a simulated user clicks (`ctseg.evaluate.clicks`: the first click
nearest the centre of the eroded structure, as the VISTA3D paper's point protocol; each next one
in the largest eroded error, positive in a miss and negative in a false positive, as its iterative
protocol, SAM-Med3D and the CVPR 2025 interactive challenge do) up to `clicks` times, through one
`ClickSession` per case (the image loaded and preprocessed once; the encoder runs once per
window). Written to `output`:
- `clicks/<case>.json`: each structure's clicks (`point` in the input CT's voxel indices, as
  `prompt.points` takes them, `label` 1/0), its Dice and seconds per click, and the settings; a
  rerun keeps the cases whose settings match (a killed run finishes by running it again), and
  `clicks_from=<an earlier output>` scores another model on the same clicks;
- `clicks.csv`: one row per case, structure and click;
- `summary.json`, `summary.md`: mean Dice after 1, 3, 5 and 10 clicks with bootstrap 95 % CIs
  (`ctseg.evaluate.statistics`), the area under the Dice-per-click curve, seconds per first and
  next click;
- `dice_vs_clicks.png`: mean Dice per click, overall (with its CI) and per structure.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import nibabel as nib
import numpy as np
from omegaconf import DictConfig
from rich.progress import track

from ctseg.atomic import write_atomic
from ctseg.config import CONFIG_DIR
from ctseg.data.layout import META, load_nifti, read_meta, same_grid
from ctseg.errors import ConfigError, DatasetError, run_cli
from ctseg.evaluate.clicks import NEXT_CLICK, Click, first_click, next_click
from ctseg.evaluate.interactive_report import CLICKS_FOLDER, OUTPUTS, markdown, write_report
from ctseg.evaluate.metrics import dice
from ctseg.inference.click_session import ClickSession, vista3d_model
from ctseg.inference.record import model_digest
from ctseg.labels import label_names
from ctseg.vista3d_labels import vista3d_ids, vista3d_labels

log = logging.getLogger(__name__)

# What a case's clicks JSON must match for a rerun to keep it.
SETTINGS = ("model_sha256", "clicks", "next_click", "seed", "with_id", "point_window",
            "clicks_from")


@dataclass(frozen=True)
class Target:
    """One structure of one case: the CT, its mask file and the structure's VISTA3D id."""

    case: str
    ct: Path
    structure: str
    mask: Path
    vista3d_id: int


@dataclass(frozen=True)
class Step:
    """What one click gave: its number (1..), the click (None: the user stopped, no error left
    after erosion; the Dice is the last click's), Dice, seconds, and whether the mask holds the
    clicked voxel (a positive click's hit; for a negative click, a miss is the hit)."""

    number: int
    click: Click | None
    dice: float
    seconds: float
    holds_click: bool = False


def simulate(segment: Callable[[Click], np.ndarray], truth: np.ndarray, budget: int,
             rng: np.random.Generator, spacing: Sequence[float] = (1.0, 1.0, 1.0),
             at: str = "random", replay: Sequence[Click] | None = None) -> list[Step]:
    """Click on one structure up to `budget` times: `segment(click)` adds a click and returns
    the structure's mask after all clicks so far; the clicks follow the protocol
    (`first_click`, `next_click`) or are `replay`'s. A Step per click number (1..budget)."""
    if budget < 1:
        raise ConfigError(f"clicks must be >= 1, got {budget}")
    steps: list[Step] = []
    predicted = np.zeros_like(truth)
    for number in range(1, budget + 1):
        if replay is not None:
            click = replay[number - 1] if number <= len(replay) else None
        elif number == 1:
            click = first_click(truth, spacing)
        else:
            click = next_click(predicted, truth, rng, spacing, at)
        if click is None:
            last = steps[-1].dice if steps else 0.0
            steps += [Step(n, None, last, 0.0) for n in range(number, budget + 1)]
            break
        start = time.perf_counter()
        predicted = np.asarray(segment(click), dtype=bool)
        seconds = time.perf_counter() - start
        steps.append(Step(number, click, dice(predicted, truth), seconds,
                          bool(predicted[click.point])))
    return steps


def structure_rng(seed: int, case: str, structure: str) -> np.random.Generator:
    """The random generator of one case's structure: the same clicks for the same seed whatever
    the order or subset of cases."""
    return np.random.default_rng([seed, zlib.crc32(f"{case}/{structure}".encode())])


def case_folders(gt: Path, split: str | None) -> list[tuple[str, Path]]:
    """(case, folder) of the cases of `gt`: a TotalSegmentator root (meta.csv; its `split`), a
    folder of case folders, or one case folder (ct.nii.gz and segmentations/)."""
    if not gt.is_dir():
        raise ConfigError(f"gt={gt}: no such folder")
    if (gt / META).is_file():
        subjects = read_meta(gt)
        chosen = [s for s in subjects if split is None or s.split == split]
        if not chosen:
            raise ConfigError(f"gt={gt}: meta.csv holds no case of split={split}")
        return [(s.image_id, s.folder) for s in chosen]
    if split is not None:
        raise ConfigError(f"split={split} needs a dataset root with meta.csv; {gt} has none "
                          "(leave split out)")
    if (gt / "ct.nii.gz").is_file():
        return [(gt.name, gt)]
    folders = sorted(p for p in gt.iterdir() if (p / "ct.nii.gz").is_file())
    if not folders:
        raise ConfigError(f"gt={gt}: neither a case folder (ct.nii.gz, segmentations/) nor a "
                          "folder of them nor a TotalSegmentator root (meta.csv)")
    return [(p.name, p) for p in folders]


def structure_ids(structures: Sequence[str]) -> dict[str, int]:
    """Structure name -> VISTA3D id; ConfigError naming a structure VISTA3D has no id for."""
    table = vista3d_labels()
    ids = dict(zip(structures, vista3d_ids(["background", *structures])[1:], strict=True))
    for name, label in ids.items():
        if label is None or label in table.unsupported:
            known = [n for n in dict.fromkeys(label_names("v1") + label_names("v2"))
                     if vista3d_ids(["background", n])[1] is not None]
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"structures: VISTA3D has no {'supported ' if label else ''}id for "
                              f"{name!r}; {hint}give TotalSegmentator mask names VISTA3D knows "
                              "(e.g. liver, spleen, kidney_left)")
    return {name: int(label) for name, label in ids.items() if label is not None}


def targets(cases: Sequence[tuple[str, Path]], ids: Mapping[str, int]) -> list[Target]:
    """Every (case, structure) to click; DatasetError naming a missing CT or mask file."""
    found = []
    for case, folder in cases:
        ct = folder / "ct.nii.gz"
        if not ct.is_file():
            raise DatasetError(ct, "the case has no CT; give folders holding ct.nii.gz")
        for name, label in ids.items():
            mask = folder / "segmentations" / f"{name}.nii.gz"
            if not mask.is_file():
                raise DatasetError(mask, f"the ground truth lacks {name}; drop it from "
                                   "structures= or give a dataset that annotates it")
            found.append(Target(case, ct, name, mask, label))
    return found


def read_case(path: Path) -> dict[str, Any]:
    """A case's clicks JSON; DatasetError when it is not one."""
    try:
        record = json.loads(path.read_text())
        record["structures"].items()
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise DatasetError(path, f"not a clicks JSON of python -m ctseg.evaluate.interactive "
                           f"({err}); delete it or run the evaluation again") from err
    return record


def replayed(folder: Path, case: str, structure: str) -> list[Click]:
    """The clicks an earlier evaluation (`clicks_from`) made on one structure of one case."""
    path = folder / CLICKS_FOLDER / f"{case}.json"
    if not path.is_file():
        raise ConfigError(f"clicks_from={folder}: no clicks for case {case} ({path}); give the "
                          "output folder of an evaluation of the same cases")
    entry = read_case(path)["structures"].get(structure)
    if entry is None or not entry.get("clicks"):
        raise ConfigError(f"clicks_from={folder}: {path} holds no clicks on {structure}; "
                          "evaluate the same structures")
    return [Click(tuple(int(i) for i in c["point"]), int(c["label"])) for c in entry["clicks"]]


def session_segmenter(session: Any, label: int | None) -> Callable[[Click], np.ndarray]:
    """`segment` of a `ClickSession`: add the click (with VISTA3D id `label`, or none), return
    the structure's mask."""
    value = 1 if label is None else label

    def segment(click: Click) -> np.ndarray:
        return session.click([list(click.point)], [click.label], label=label) == value

    return segment


def evaluate_case(model: Any, case: str, items: Sequence[Target], settings: Mapping[str, Any],
                  device: str, clicks_from: Path | None,
                  clicked: Callable[[Target, ClickSession], None] | None = None
                  ) -> dict[str, Any]:
    """Click every structure of one case through one click session (`clicked(target,
    session)` called after each structure's last click, its labels and prompt in the session);
    the case's record."""
    structures: dict[str, Any] = {}
    empty: list[str] = []
    with ClickSession.open(model, items[0].ct, device=device,
                           point_window=settings["point_window"]) as session:
        ct = nib.load(items[0].ct)  # its header: the session has read and checked the voxels
        spacing = tuple(float(s) for s in ct.header.get_zooms()[:3])
        for target in items:
            image = load_nifti(target.mask, "re-download it")
            if not same_grid(image, ct):
                raise DatasetError(target.mask, f"grid {image.shape} differs from the CT's "
                                   f"{ct.shape}; the masks must share the CT's grid")
            truth = np.asarray(image.dataobj) > 0
            if not truth.any():
                log.info("%s: %s is empty in the ground truth, not clicked", case,
                         target.structure)
                empty.append(target.structure)
                continue
            session.reset()
            runs = session.encoder_runs
            steps = simulate(
                session_segmenter(session, target.vista3d_id if settings["with_id"] else None),
                truth, settings["clicks"],
                structure_rng(settings["seed"], case, target.structure), spacing,
                settings["next_click"],
                None if clicks_from is None else replayed(clicks_from, case, target.structure))
            if clicked is not None:
                clicked(target, session)
            structures[target.structure] = {
                "vista3d_id": target.vista3d_id, "voxels": int(truth.sum()),
                "clicks": [s.click.as_json() for s in steps if s.click is not None],
                "dice": [s.dice for s in steps], "seconds": [s.seconds for s in steps],
                "first_click_hit": steps[0].holds_click,
                "encoder_runs": session.encoder_runs - runs}
    return {"case": case, "ct": str(items[0].ct), "settings": dict(settings),
            "structures": structures, "empty": empty}


def grouped(items: Sequence[Target]) -> Iterator[tuple[str, list[Target]]]:
    """The targets by case, in order."""
    cases: dict[str, list[Target]] = {}
    for item in items:
        cases.setdefault(item.case, []).append(item)
    yield from cases.items()


def interactive_config(*overrides: str) -> DictConfig:
    """conf/interactive.yaml composed with `overrides` (e.g. "ckpt=last.ckpt", "gt=data"): the
    command line's settings and defaults for `prepare` / `evaluate_clicks` called from Python."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("interactive", overrides=list(overrides))


@dataclass(frozen=True)
class Prepared:
    """An evaluation with every input checked: the model, the targets, the settings its clicks
    JSONs record, the evaluation it replays (or None) and the output folder."""

    model: Any
    items: list[Target]
    settings: dict[str, Any]
    clicks_from: Path | None
    output: Path


def prepare(cfg: DictConfig | Mapping[str, Any]) -> Prepared:
    """Check every input of `cfg` (conf/interactive.yaml's keys, `interactive_config`) and load
    the model."""
    budget = cfg["clicks"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"clicks must be an integer >= 1 (the click budget per structure), "
                          f"got {budget!r}")
    at = str(cfg["next_click"])
    if at not in NEXT_CLICK:
        raise ConfigError(f"next_click must be one of {', '.join(NEXT_CLICK)}, got {at!r}")
    structures = list(cfg["structures"] or [])
    if not structures:
        raise ConfigError("structures: give at least one, e.g. structures=[liver,spleen]")
    ckpt = Path(str(cfg["ckpt"]))
    if not ckpt.is_file():
        raise ConfigError(f"ckpt={ckpt}: no such file; give a VISTA3D checkpoint (.ckpt) or the "
                          "vista3d bundle's model.pt")
    clicks_from = Path(str(cfg["clicks_from"])) if cfg["clicks_from"] else None
    if clicks_from is not None and not (clicks_from / CLICKS_FOLDER).is_dir():
        raise ConfigError(f"clicks_from={clicks_from}: no {CLICKS_FOLDER}/ folder; give the "
                          "output folder of an earlier python -m ctseg.evaluate.interactive")
    items = targets(case_folders(Path(str(cfg["gt"])), cfg["split"]),
                    structure_ids(structures))
    model = vista3d_model(ckpt, f"ckpt={ckpt}: interactive evaluation")
    settings = {"model_sha256": model_digest(ckpt), "clicks": budget, "next_click": at,
                "seed": int(cfg["seed"]), "with_id": bool(cfg["with_id"]),
                "point_window": bool(cfg["point_window"]),
                "clicks_from": None if clicks_from is None else str(clicks_from)}
    return Prepared(model, items, settings, clicks_from, Path(str(cfg["output"])))


def write_case(out: Path, record: Mapping[str, Any]) -> None:
    """Write one case's record as `out`/clicks/<case>.json (atomically)."""
    text = json.dumps(record, indent=1) + "\n"
    write_atomic(out / CLICKS_FOLDER / f"{record['case']}.json",
                 lambda tmp: tmp.write_text(text))


def evaluate_clicks(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Check every input, click every case (keeping the cases an earlier run with the same
    settings finished), write the outputs; the summary."""
    plan = prepare(cfg)
    settings, out = plan.settings, plan.output
    structures = list(cfg["structures"])
    records = []
    cases = list(grouped(plan.items))
    for case, case_items in track(cases, description="clicks",
                                  disable=not cfg["progress"]):
        path = out / CLICKS_FOLDER / f"{case}.json"
        if path.is_file():
            old = read_case(path)
            if {k: old.get("settings", {}).get(k) for k in SETTINGS} == \
                    {k: settings[k] for k in SETTINGS} and \
                    {*old["structures"], *old.get("empty", ())} >= \
                    {t.structure for t in case_items}:
                log.info("%s: clicked by an earlier run with these settings, kept", case)
                records.append(old)
                continue
        log.info("%s: clicking %d structure(s), %d click(s) each", case, len(case_items),
                 settings["clicks"])
        record = evaluate_case(plan.model, case, case_items, settings,
                               str(cfg["device"]), plan.clicks_from)
        write_case(out, record)
        records.append(record)
    wanted = set(structures)
    for record in records:
        record["structures"] = {k: v for k, v in record["structures"].items() if k in wanted}
    if not any(r["structures"] for r in records):
        raise DatasetError(Path(str(cfg["gt"])), f"none of {', '.join(structures)} has a voxel "
                           "in these cases; nothing was clicked")
    summary = write_report(records, out, [int(k) for k in cfg["report_at"] or []], settings,
                           int(cfg["seed"]))
    summary["output"] = str(out)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="interactive")
def main(cfg: DictConfig) -> None:
    """Evaluate the clicks, print the summary table and where the outputs went."""
    summary = evaluate_clicks(cfg)
    print(markdown(summary).split("\n\n")[1])
    print("written: " + ", ".join(str(Path(summary["output"]) / o)
                                  for o in (*OUTPUTS, CLICKS_FOLDER + "/")))


def cli() -> None:
    """Console entry point (`ctseg-interactive`, `python -m ctseg.evaluate.interactive`)."""
    run_cli(main, "python -m ctseg.evaluate.interactive")


if __name__ == "__main__":
    cli()
