"""`emerdiff evaluate` and `emerdiff compare`: argument parsing only (Namespace -> config -> runner).

The engine is :func:`emerdiff.evaluation.runner.run_evaluation`; this module turns the flags into
its arguments (the method settings through :func:`emerdiff.cli.options.config_from_args`, the one
command line -> config path). Run standalone as ``python -m emerdiff.cli.evaluate ...`` (same
arguments as ``emerdiff evaluate``). Several processes:
``accelerate launch --num_processes 4 -m emerdiff.cli.evaluate --data D --out O``
(one GPU each). On a CPU-only machine add ``--multi_gpu``: accelerate's
``--cpu`` flag starts one process unless an MPI hostfile is given, while the
torchrun-based launcher starts N processes, which then use CPU + gloo.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emerdiff.cli.options import add_config_args, add_labeller_args, add_threads_arg, config_from_args
from emerdiff.evaluation.datasets import LAYOUTS
from emerdiff.files import check_output_dir, write_atomic_bytes

if TYPE_CHECKING:
    from emerdiff.evaluation.datasets import SegmentationDataset
    from emerdiff.evaluation.runner import SegmentFn

# The names of emerdiff.evaluation.protocols.PROTOCOLS and KNOWN_PROTOCOLS, for the parsers' choices:
# that module (metrics, bootstrap: scipy, torch) is imported only when a command runs, so `--help` and
# a refused argument load no torch, scipy or sklearn (issue 25). tests/test_startup.py checks they agree.
PROTOCOL_NAMES: tuple[str, ...] = ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean")
KNOWN_PROTOCOL_NAMES: tuple[str, ...] = (*PROTOCOL_NAMES, "majority")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root folder (required)")
    p.add_argument("--layout", default="folder", choices=sorted(LAYOUTS),
                   help="folder: images/ + labels/ + classes.txt; or a benchmark layout (default: folder)")
    p.add_argument("--split", default=None,
                   help="benchmark split (default: its validation split); folder layout: a sub-folder")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="void label value of the folder layout (default: 255)")
    p.add_argument("--protocol", default="all", choices=[*KNOWN_PROTOCOL_NAMES, "all", "openvocab"],
                   help="per_image_hungarian: each image's masks matched to its own classes (as DiffSeg/"
                        "DiffCut report); dataset_hungarian: dataset k-means + one Hungarian matching (as "
                        "EmerDiff reports); concept: nearest GT concept embedding (the paper's: mean mask "
                        "embedding over the class's pixels), no matching; concept_token_mean: the same with "
                        "token-mean concepts; all: these four, from the same cached records; openvocab: "
                        "class names from the dataset's class list by an open-vocabulary labeller, alone "
                        "and pooled in EmerDiff masks, no matching; majority (an oracle, not in all): each mask "
                        "takes its own majority GT class, the label map's quality apart from any labelling "
                        "step (default: all)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the images for the 95 %% interval of every mIoU and of every "
                        "difference between methods; 0 disables (default: 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: 0)")
    add_labeller_args(p, "with --protocol openvocab: ")
    p.add_argument("--model", default="reference",
                   help="'reference', a diffusers folder, a hub id or 'tiny' (default: reference)")
    p.add_argument("--out", required=True, help="output folder (per_image/, results.json, results.csv) (required)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only (default: all)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: the process's accelerate device)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    add_threads_arg(p)
    add_config_args(p)  # the method settings of `segment`, --set FIELD=VALUE for any field; --seed also seeds
    # the protocols' dataset k-means


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command on an argparse subparsers object."""
    p = subparsers.add_parser(
        "evaluate", help="score a labelled dataset (mIoU under per-image/dataset Hungarian and concept protocols)",
        description="Segment every image of a labelled dataset, cache per-image results in "
                    "OUT/per_image (resumable), and write OUT/results.json and OUT/results.csv "
                    "with one row per protocol and method (emerdiff, nearest, bilinear, the image-guided "
                    "guided_filter and joint_bilateral, any other the records hold) with a 95 % bootstrap "
                    "interval, the boundary metrics of each, and OUT/per_class.csv. "
                    "Runs under `accelerate launch` to share the images between processes/GPUs.")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser (``python -m emerdiff.cli.evaluate``)."""
    p = argparse.ArgumentParser(prog="emerdiff evaluate",
                                description="`emerdiff evaluate`: segment a labelled dataset and score it with the "
                                            "paper's protocols.")
    _add_arguments(p)
    return p



def _open_dataset(args: argparse.Namespace) -> SegmentationDataset:
    """The dataset of ``--data``/``--layout``; a missing folder or file is a ValueError saying which."""
    from emerdiff.evaluation.datasets import open_dataset

    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(f"--data {root}: dataset folder does not exist{' (it is a file)' if root.exists() else ''}; "
                         "pass the dataset root (folder layout: images/, labels/ and classes.txt)")
    try:
        return open_dataset(args.layout, args.data, split=args.split, ignore_index=args.ignore_index)
    except FileNotFoundError as err:
        raise ValueError(f"--data {root} (--layout {args.layout}): {err}") from err


def run(args: argparse.Namespace, segment_fn: SegmentFn | None = None) -> int:
    """Run ``emerdiff evaluate``; returns the exit code.

    Args:
        args: parsed arguments (see :func:`add_parser`).
        segment_fn: ``image -> segmentation`` used instead of loading ``args.model`` (tests
            inject a fake; its settings are not checked).
    """
    from emerdiff.evaluation.runner import run_evaluation

    if args.quiet and segment_fn is None:  # weight-loading bars off (as `segment --quiet`)
        from emerdiff.cli.options import quiet_libraries

        quiet_libraries()
    check_output_dir(Path(args.out))
    config = config_from_args(args)
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: give a number of resamples >= 0 (0 disables)")
    dataset = _open_dataset(args)
    if segment_fn is None:  # torch threads: emerdiff.threads' policy unless --threads (issue 29)
        from emerdiff.cli.options import use_threads

        use_threads(args, quiet=args.quiet)
    payload = run_evaluation(dataset, args.model if segment_fn is None else segment_fn,
                             config if segment_fn is None else None, args.out, protocols=args.protocol,
                             labeller=args.labeller, clip_model=args.clip_model, n_boot=args.bootstrap,
                             bootstrap_seed=args.bootstrap_seed, protocol_seed=args.seed, limit=args.limit,
                             device=args.device, dtype=args.dtype, quiet=args.quiet, model=args.model,
                             data=args.data, layout=args.layout, split=args.split)
    # as `segment`: images that failed (reported one by one, and in the summary) make the exit code 1
    return 1 if payload.get("config", {}).get("failed_images") else 0


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``compare`` sub-command (two ``evaluate`` output folders side by side)."""
    p = subparsers.add_parser(
        "compare", help="two evaluate output folders side by side: mIoU, difference, paired interval",
        description="Recompute every protocol x method mIoU of two `emerdiff evaluate` output folders "
                    "on the images both hold (from their cached per-image records, no segmentation) "
                    "and print A, B and A - B, each with a 95 % bootstrap interval over those images "
                    "(paired: both runs resampled alike), then the boundary metrics (Boundary IoU, "
                    "boundary F) of every method both runs scored, the same way. The runs must score the "
                    "same dataset (same class list and, image by image, the same image and labels).")
    p.add_argument("run_a", metavar="RUN_A", help="output folder of one `emerdiff evaluate` run")
    p.add_argument("run_b", metavar="RUN_B", help="output folder of another run")
    p.add_argument("--protocol", default="all", choices=[*KNOWN_PROTOCOL_NAMES, "all"],
                   help="protocol(s) to compare (default: all = every protocol but the majority oracle)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the shared images; 0: values only (default: 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the comparison as JSON (default: no)")
    p.set_defaults(func=compare_command)
    return p



def compare_command(args: argparse.Namespace) -> int:
    """Run ``emerdiff compare RUN_A RUN_B``: print the table (and write ``--json``)."""
    from emerdiff.evaluation.compare import compare_runs, comparison_table
    from emerdiff.evaluation.protocols import PROTOCOLS
    from emerdiff.evaluation.results import json_safe

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: give a number of resamples >= 0 (0: values only)")
    protocols = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    result = compare_runs(args.run_a, args.run_b, protocols, args.bootstrap, args.bootstrap_seed)
    print(comparison_table(result), end="")
    if args.json:
        write_atomic_bytes(Path(args.json), (json.dumps(json_safe(result), indent=2) + "\n").encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m emerdiff.cli.evaluate``: no traceback reaches a user (``--debug`` or
    ``EMERDIFF_DEBUG=1`` re-raise; :func:`emerdiff.cli.options.run_guarded`)."""
    from emerdiff.cli.options import pop_debug_flag, run_guarded

    argv, debug = pop_debug_flag(argv)
    args = build_parser().parse_args(argv)
    return run_guarded("evaluate", f"--data {args.data}", lambda: run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
