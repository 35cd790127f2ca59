"""Command line of the data tools: `python -m ctseg.data {prepare,check,phantoms} --help`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctseg.data.layout import detect_layout, read_meta, subject_problems
from ctseg.data.phantoms import LAYOUTS, phantom_defaults
from ctseg.errors import CtsegError
from ctseg.labels import VERSIONS, label_names

# The class table of prepare, check and the small phantoms when --version is not given.
DEFAULT_VERSION = "v1"
# Sizes of `phantoms`: the small phantoms (the default), a simulated download at full size.
SIZES = ("phantom", "wholebody")
console = Console()
# errors go to stderr, as every other ctseg CLI writes them
error_console = Console(stderr=True)


def _prepare(args: argparse.Namespace) -> int:
    """Merge each root and print per-split subject counts and per-class voxel totals."""
    from ctseg.data.merge import prepare

    for root in args.roots:
        if detect_layout(root) == "nnunet":
            from ctseg.data.nnunet import prepare_nnunet
            from ctseg.label_space import LabelSpace

            dataset = prepare_nnunet(root, LabelSpace(args.version), root.name, out=args.out,
                                     workers=args.workers, progress=True)
        else:
            dataset = prepare(root, out=args.out, version=args.version, workers=args.workers,
                              progress=True)
        console.print(f"[bold]{escape(str(dataset.root))}[/] ({args.version}) -> "
                      f"{escape(str(Path(dataset.records[0]['label']).parent))}",
                      soft_wrap=True)
        splits = Table("split", "subjects", title="subjects per split")
        for split, count in dataset.split_counts().items():
            splits.add_row(split, str(count))
        console.print(splits)
        totals = dataset.voxel_totals()
        names = label_names(args.version)
        classes = Table("index", "class", "voxels", title="voxels per class (all subjects)")
        for index, total in enumerate(totals):
            if total or args.all_classes:
                classes.add_row(str(index), names[index], f"{int(total):,}")
        console.print(classes)
        absent = [names[i] for i in range(1, len(names)) if not totals[i]]
        if absent and not args.all_classes:
            console.print(f"{len(absent)} classes have no voxel (--all-classes lists them)")
    return 0


def _check(args: argparse.Namespace) -> int:
    """List every problem of a dataset folder (its layout recognised by its files); exit status
    1 when there is any."""
    from rich.progress import track

    if detect_layout(args.root) == "nnunet":
        return _check_nnunet(args)
    subjects = read_meta(args.root)
    problems: list[str] = []
    for subject in track(subjects, description="checking subjects", console=console):
        problems += subject_problems(subject, args.version)
    return _report(problems, len(subjects), args.root,
                   f"a complete TotalSegmentator {args.version} download")


def _check_nnunet(args: argparse.Namespace) -> int:
    """Check an nnU-Net raw dataset: dataset.json, every case, label names onto the classes."""
    from rich.progress import track

    from ctseg.data.nnunet import case_problems, read_cases, read_dataset_json
    from ctseg.label_space import LabelSpace

    dataset = read_dataset_json(args.root)
    cases = read_cases(dataset)
    problems: list[str] = []
    try:
        LabelSpace(args.version).mapping(dataset.labels, args.root.name)
    except CtsegError as err:
        problems.append(str(err))
    for case in track(cases, description="checking cases", console=console):
        problems += case_problems(case, dataset)
    return _report(problems, len(cases), args.root,
                   f"an nnU-Net raw dataset whose labels are TotalSegmentator {args.version} "
                   "classes")


def _report(problems: list[str], count: int, root: Path, verdict: str) -> int:
    """Print the problems found (exit status 1) or the verdict (0)."""
    if problems:
        for line in problems:
            console.print(f"[red]✗[/] {escape(line)}", soft_wrap=True)
        console.print(f"{len(problems)} problem(s) in {count} subject(s)")
        return 1
    console.print(f"[green]✓[/] {count} subject(s) in {escape(str(root))} are {verdict}",
                  soft_wrap=True)
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    """Write synthetic CT phantoms in the TotalSegmentator layout (or nnU-Net's), or with `--size
    wholebody` a simulated download at a real CT's size."""
    if args.size == "wholebody":
        from ctseg.data.simulated_download import WHOLEBODY_VERSION, write_wholebody_phantoms

        default = phantom_defaults()
        given = [option for option, value, unset in (
            ("--shape", tuple(args.shape), tuple(default.shape)),
            ("--spacing", args.spacing, default.spacing), ("--structures", args.structures, None),
            ("--layout nnunet", args.layout, "totalseg")) if value != unset]
        if given:
            raise ValueError(f"{', '.join(given)}: not with --size wholebody, whose grids are a "
                             "real CT's (shrink them with --scale)")
        write_wholebody_phantoms(args.out, n=args.n, seed=args.seed,
                                 version=args.version or WHOLEBODY_VERSION,
                                 scale=1.0 if args.scale is None else args.scale, progress=True)
        return 0
    from ctseg.data.phantoms import write_phantoms

    if args.scale is not None:
        raise ValueError("--scale: only with --size wholebody (phantoms take --shape)")
    write_phantoms(args.out, n=args.n, seed=args.seed, version=args.version or DEFAULT_VERSION,
                   shape=tuple(args.shape), spacing=args.spacing, progress=True,
                   layout=args.layout, structures=args.structures)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m ctseg.data`."""
    parser = argparse.ArgumentParser(
        prog="python -m ctseg.data", description="Prepare, check and synthesise datasets "
        "(TotalSegmentator downloads, nnU-Net raw datasets). The raw data is only ever read.")
    sub = parser.add_subparsers(dest="command", required=True)
    version = {"choices": VERSIONS, "default": DEFAULT_VERSION,
               "help": f"TotalSegmentator class table: v1 (104 classes) or v2 (117); default "
               f"{DEFAULT_VERSION}"}

    p = sub.add_parser("prepare", help="merge per-structure masks into label maps (cached)")
    p.add_argument("roots", nargs="+", type=Path,
                   help="dataset root(s): TotalSegmentator downloads or nnU-Net raw datasets")
    p.add_argument("--version", **version)
    p.add_argument("--out", type=Path, default=None,
                   help="prepared folder (default: $CTSEG_CACHE/prepared/<name>-<hash>)")
    p.add_argument("--workers", type=int, default=4, help="parallel processes (default 4)")
    p.add_argument("--all-classes", action="store_true", help="list classes with no voxel too")
    p.set_defaults(func=_prepare)

    c = sub.add_parser("check", help="validate a dataset folder and list every problem")
    c.add_argument("root", type=Path, help="dataset root: a TotalSegmentator download (meta.csv) "
                   "or an nnU-Net raw dataset (dataset.json)")
    c.add_argument("--version", **version)
    c.set_defaults(func=_check)

    default = phantom_defaults()
    g = sub.add_parser("phantoms", help="write synthetic CT phantoms in the download layout "
                       "(defaults: conf/data/phantoms.yaml's, as train.py writes them)")
    g.add_argument("out", type=Path, help="output folder")
    g.add_argument("--n", type=int, default=default.n,
                   help=f"number of phantoms (default {default.n})")
    g.add_argument("--seed", type=int, default=default.seed,
                   help=f"random seed (default {default.seed})")
    g.add_argument("--version", choices=VERSIONS, default=None,
                   help=f"TotalSegmentator class table: v1 (104 classes) or v2 (117); default "
                   f"{DEFAULT_VERSION}, with --size wholebody v2")
    g.add_argument("--size", choices=SIZES, default=SIZES[0],
                   help="phantom (default: small abdomen phantoms, --shape and --spacing) or "
                   "wholebody (a simulated download at a real CT's size: 512 x 512 x 200-800 "
                   "voxels at 0.7-0.9 mm in-plane and 1.5-5 mm slices, flipped axes, every mask "
                   "of the version, most empty, the v2 meta.csv; about 200 MB per subject)")
    g.add_argument("--scale", type=float, default=None,
                   help="with --size wholebody: voxel counts times SCALE, in (0, 1], the voxel "
                   "sizes kept (default 1; 0.0625 writes 32 x 32 x 16-50 for tests)")
    g.add_argument("--shape", type=int, nargs=3, default=list(default.shape),
                   metavar=("X", "Y", "Z"), help=f"voxels per axis of a phantom (default "
                   f"{' '.join(map(str, default.shape))})")
    g.add_argument("--spacing", type=float, default=default.spacing,
                   help=f"voxel size of a phantom in mm (default {default.spacing})")
    g.add_argument("--layout", choices=LAYOUTS, default="totalseg",
                   help="totalseg (the download's folders, default) or nnunet (dataset.json, "
                   "imagesTr, labelsTr, imagesTs, labelsTs)")
    g.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                   help="with --layout nnunet: the structures labelled (default all phantom "
                   "structures; liver_tumour also draws a lesion into each liver)")
    g.set_defaults(func=_phantoms)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors are printed in one line naming the file, with exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CtsegError, ValueError, FileNotFoundError) as err:
        error_console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
