"""`emerdiff table2`: the paper's Table 2 layout in one command (argument parsing only; issue 26).

The logic is :mod:`emerdiff.evaluation.table2`; the evaluation engine
:func:`emerdiff.evaluation.runner.run_evaluation`. Heavy imports stay inside the command, so
``emerdiff --help`` and a refused argument load no torch, scipy or sklearn (issue 25).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emerdiff.cli.options import add_config_args, add_threads_arg
from emerdiff.evaluation.datasets import LAYOUTS

DESCRIPTION = """\
Write the paper's Table 2 (EmerDiff, ICLR 2024) for MODEL on DATA: mIoU under the paper's modified
protocol (`concept`: one concept embedding per class, nearest concept per mask, no Hungarian
matching) of the paper's two rows, SD bilinear upsampling (the baseline) and EmerDiff, with our
rows beside them: nearest upsampling, the guided filter, joint bilateral upsampling (the same
segments, only the readout differs), and the majority oracle of every method (each mask its own
majority class: the label map apart from the labelling). Every number has its 95 % paired
bootstrap interval over the images; each method's difference to bilinear and its Boundary IoU too.
The table names the test set, and on ADE20K-150 (--layout ade20k) and COCO-Stuff-171
(--layout cocostuff171) it shows the paper's numbers beside ours (bilinear 29.1 / EmerDiff 33.1;
27.6 / 30.5).

Writes OUT/table2.md, OUT/table2.csv and OUT/table2.json; a fresh run also OUT/evaluate/ (the
`emerdiff evaluate` outputs: per-image cache, resumable, results.json). With --from-run RUN the
table is read from an existing `emerdiff evaluate` output folder instead (nothing is segmented;
the majority oracle is scored from RUN's cached records if RUN did not score it)."""

EPILOG = """\
examples:
  emerdiff table2 ADEChallengeData2016 --layout ade20k --model ./stable-diffusion-v1-5 --out t2_ade
  emerdiff table2 cocostuff --layout cocostuff171 --model ./stable-diffusion-v1-5 --out t2_coco
  emerdiff table2 my_scenes --model reference --out t2_scenes --limit 20     # a folder dataset
  emerdiff table2 --from-run runs/my_evaluate --out t2_from_run             # an existing evaluate run"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``table2`` sub-command on an argparse subparsers object."""
    p = subparsers.add_parser("table2", help="the paper's Table 2 (concept protocol, EmerDiff vs bilinear, with "
                              "our baselines and intervals) in one command",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="dataset root folder to evaluate (leave out with --from-run)")
    p.add_argument("--from-run", default=None, metavar="RUN",
                   help="read an existing `emerdiff evaluate` output folder instead of evaluating DATA "
                   "(default: evaluate DATA)")
    p.add_argument("--out", required=True, help="output folder: table2.md/.csv/.json (+ evaluate/ for a fresh run) "
                   "(required)")
    p.add_argument("--layout", default="folder", choices=sorted(LAYOUTS),
                   help="folder: images/ + labels/ + classes.txt; ade20k (ADE20K-150) and cocostuff171 "
                   "(COCO-Stuff-171) are the paper's Table 2 datasets (default: folder)")
    p.add_argument("--split", default=None, help="benchmark split (default: its validation split, the paper's)")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="void label value of the folder layout (default: 255)")
    p.add_argument("--model", default="reference",
                   help="'reference', a diffusers folder (e.g. Stable Diffusion 1.5, the paper's), a hub id or "
                   "'tiny' (default: reference)")
    p.add_argument("--limit", type=int, default=None,
                   help="the first N images only: the table then says it is a subset (default: all)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the images for the 95 %% intervals, at least 100 (default: 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    add_threads_arg(p)
    add_config_args(p)
    p.set_defaults(func=cmd_table2)
    return p


# Flags that only a fresh evaluation uses: refused with --from-run rather than silently ignored.
_EVALUATE_ONLY = (("data", None, "DATA"), ("layout", "folder", "--layout"), ("split", None, "--split"),
                  ("ignore_index", None, "--ignore-index"), ("limit", None, "--limit"),
                  ("device", None, "--device"), ("dtype", None, "--dtype"), ("threads", None, "--threads"))


def cmd_table2(args: argparse.Namespace) -> int:
    """Run ``emerdiff table2``; returns the exit code (1 if some images failed in a fresh run)."""
    from emerdiff.cli.options import user_changes

    if args.from_run is not None:
        given = [flag for name, default, flag in _EVALUATE_ONLY if getattr(args, name) != default]
        given += [f"--{k.replace('_', '-')}" for k in user_changes(args)]
        if args.bootstrap != 1000 or args.bootstrap_seed != 0:
            given.append("--bootstrap/--bootstrap-seed")
        if given:
            raise ValueError(f"--from-run {args.from_run} reads a finished run with its own dataset, settings and "
                             f"resamples; {', '.join(given)} would be ignored: leave them out, or evaluate afresh "
                             "with DATA instead of --from-run")
        from emerdiff.evaluation.table2 import table2_from_run

        table, paths = table2_from_run(args.from_run, args.out)
        print(Path(paths[0]).read_text(), end="")
        print(f"-> {', '.join(map(str, paths))}", file=sys.stderr)
        return 0
    if args.data is None:
        raise ValueError("give DATA (a dataset root folder to evaluate) or --from-run RUN (an `emerdiff evaluate` "
                         "output folder); see `emerdiff table2 --help`")
    if args.bootstrap < 100:
        raise ValueError(f"--bootstrap {args.bootstrap}: every number of Table 2 carries an interval; give at least "
                         "100 resamples (default 1000)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a number of images >= 1, or leave it out for all")
    from emerdiff.cli.options import config_from_args
    from emerdiff.files import check_output_dir

    check_output_dir(Path(args.out))
    config = config_from_args(args)
    dataset = _open_dataset(args)
    if args.quiet:
        from emerdiff.cli.options import quiet_libraries

        quiet_libraries()
    from emerdiff.cli.options import use_threads

    use_threads(args, quiet=args.quiet)  # issue 29: emerdiff.threads' policy unless --threads
    from emerdiff.evaluation.table2 import run_table2

    table, paths = run_table2(dataset, args.model, config, args.out, n_boot=args.bootstrap,
                              bootstrap_seed=args.bootstrap_seed, protocol_seed=args.seed, limit=args.limit,
                              device=args.device, dtype=args.dtype, quiet=args.quiet, model=args.model,
                              data=args.data, layout=args.layout, split=args.split)
    print(Path(paths[0]).read_text(), end="")
    print(f"-> {', '.join(map(str, paths))} (evaluation outputs in {Path(args.out) / 'evaluate'})", file=sys.stderr)
    return 1 if table["failed_images"] else 0  # as `evaluate`: images that failed make the exit code 1


def _open_dataset(args: argparse.Namespace) -> Any:
    from emerdiff.evaluation.datasets import open_dataset

    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(f"DATA {root}: dataset folder does not exist{' (it is a file)' if root.exists() else ''}; "
                         "pass the dataset root (folder layout: images/, labels/ and classes.txt; ade20k: "
                         "ADEChallengeData2016; cocostuff171: the folder with images/ and annotations/)")
    try:
        return open_dataset(args.layout, args.data, split=args.split, ignore_index=args.ignore_index)
    except FileNotFoundError as err:
        raise ValueError(f"DATA {root} (--layout {args.layout}): {err}") from err
