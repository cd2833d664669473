"""Reduced-step readout: UNet calls saved vs agreement with the full schedule, and mIoU.

    python benchmarks/readout_study.py                         # tiny model (random weights!)
    python benchmarks/readout_study.py --model reference --scenes 20 --blur 1   # issue 6's claim
    python benchmarks/readout_study.py --model /path/to/sd --resolution 512 --k 25 --device cuda

For each image the full-schedule path and every readout path run as
``EmerDiff`` runs them: the full schedule prepares with the inversion over
t <= t_m (its t_f call gives the Step A features) and denoises the modulated
batch through every step after t_m with the stored noise maps; a readout path
(``readout_steps`` in {1, 2, 3, 5}: deterministic DDIM jumps, 1 = the x0
prediction of the modulated call) prepares with *no* inversion -- the readout
never reads a noise map, so ``EmerDiff.prepare`` samples x_t and runs only the
feature call -- i.e. 1 feature call + ``readout_steps`` x chunks. Reported per
setting:

* calls: UNet calls per image, all stages; ``inversion`` the inversion's share
  (0 on the readout paths); ``saved`` = full-schedule calls minus this row's,
  ``x fewer`` = their ratio;
* samples: UNet batch elements, the CPU-relevant cost;
* agree: pixel agreement of the final labels with the full schedule's labels
  (the k-means segments are the same -- ``same_seg`` checks it -- so no
  matching is needed);
* mIoU: per-image Hungarian matching of the labels to the ground truth
  (``emerdiff.evaluation.metrics.hungarian_miou``), averaged over the images that have
  ground truth: held-out scenes (``--scenes N`` or ``scene:N`` names), the
  built-in PASCAL VOC photo (``voc_sample``, the default);
* prep_s / modulation_s: wall seconds of the preparation (encode, inversion or
  feature call, k-means) and of the modulated denoising + decode.

With random weights (tiny, sd15-random) the numbers say nothing about quality;
they check that the study runs. The claim to test (issue 6) is on the reference
model: >= 10x fewer UNet calls at >= 90 % agreement, mIoU within 1 point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    EmerDiffConfig,
    build_model,
    config_for,
    machine_info,
    pixel_agreement,
)

from emerdiff.evaluation.datasets import load_probe_images  # noqa: E402
from emerdiff.evaluation.metrics import hungarian_miou  # noqa: E402
from emerdiff.method.modulation import CallCounter  # noqa: E402
from emerdiff.method.pipeline import EmerDiff  # noqa: E402


def _labels(pipe: EmerDiff, prepared: Any, counter: CallCounter) -> np.ndarray:
    maps, _ = pipe.perturb(prepared, counter=counter)
    return pipe.readout(maps, prepared, prepared.image_size)  # Step D as segment runs it


def readout_study(model: Any, images: Sequence[Any], config: EmerDiffConfig,
                  gts: Sequence[np.ndarray] | None = None, num_classes: int | None = None,
                  readout_steps: Sequence[int] = (1, 2, 3, 5)) -> list[dict[str, Any]]:
    """Rows (full schedule first) averaged over ``images``; see the module docstring.

    Each row also carries ``unet_calls``: mean UNet calls per stage (a stage
    appears if any image called the UNet in it), e.g. no "inversion" key on
    the readout paths.
    """
    settings: list[int | None] = [None, *readout_steps]
    acc: dict[Any, dict[str, list[float]]] = {s: {} for s in settings}
    by_stage: dict[Any, dict[str, list[int]]] = {s: {} for s in settings}

    def add(s: Any, key: str, v: float) -> None:
        acc[s].setdefault(key, []).append(v)

    for i, image in enumerate(images):
        full_labels = full_segments = None
        for s in settings:
            pipe = EmerDiff(model, config_for(model, config, readout_steps=s))
            t0 = time.perf_counter()
            prepared = pipe.prepare(image)
            add(s, "prep_s", time.perf_counter() - t0)
            counter = prepared.counter  # preparation and modulation counted together
            t0 = time.perf_counter()
            labels = _labels(pipe, prepared, counter)
            add(s, "modulation_s", time.perf_counter() - t0)
            add(s, "calls", sum(counter.calls.values()))
            add(s, "inversion", counter.calls.get("inversion", 0))
            add(s, "samples", sum(counter.samples.values()))
            for stage, n in counter.calls.items():
                by_stage[s].setdefault(stage, []).append(n)
            if s is None:
                full_labels, full_segments = labels, prepared.segments.labels
            add(s, "agree", pixel_agreement(full_labels, labels))
            add(s, "same_seg", float(np.array_equal(full_segments, prepared.segments.labels)))
            if gts is not None:
                add(s, "miou", hungarian_miou(labels, gts[i], num_classes or int(gts[i][gts[i] != 255].max()) + 1))
    rows = []
    full_calls = float(np.mean(acc[None]["calls"]))
    for s in settings:
        row: dict[str, Any] = {"readout": "full" if s is None else s}
        row.update({k: float(np.mean(v)) for k, v in acc[s].items()})
        row["saved"] = full_calls - row["calls"]
        row["x fewer"] = full_calls / row["calls"]
        row["unet_calls"] = {k: float(np.sum(v)) / len(images) for k, v in by_stage[s].items()}
        rows.append(row)
    return rows


COLS = ["readout", "calls", "inversion", "saved", "x fewer", "samples", "agree", "same_seg", "miou",
        "prep_s", "modulation_s"]


def format_rows(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    def fmt(v: Any, c: str) -> str:
        if v is None:
            return "-"
        if c in ("agree", "same_seg"):
            return f"{100 * v:.1f}%"
        if c == "x fewer":
            return f"{v:.1f}x"
        if isinstance(v, float):
            return f"{v:.1f}" if c in ("calls", "inversion", "saved", "samples") else f"{v:.2f}"
        return str(v)

    cells = [[fmt(r.get(c), c) for c in COLS] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    w = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLS)]
    return "\n".join("  ".join(v.rjust(n) for v, n in zip(vals, w)) for vals in [COLS, *cells])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | reference | sd15-random | sd21-random | folder / hub id")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="schedule length (50 = paper)")
    p.add_argument("--t-m", type=int, default=281)
    p.add_argument("--max-batch", type=int, default=17)
    p.add_argument("--readout-steps", default="1,2,3,5")
    p.add_argument("--images", nargs="*", default=None,
                   help="probe image names: scene:N (held-out scene with GT), voc_sample (GT), a scikit-image "
                        "sample or an image file (no GT); default voc_sample")
    p.add_argument("--scenes", type=int, default=0, metavar="N",
                   help="add held-out scenes 0..N-1 of the reference world (with GT)")
    p.add_argument("--blur", type=float, default=EmerDiffConfig.blur_sigma,
                   help="Gaussian sigma of the difference maps (1 for the 128 px reference model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device, args.dtype)
    cfg = EmerDiffConfig(resolution=args.resolution, num_clusters=args.k, num_inference_steps=args.steps,
                         modulation_timestep=args.t_m, max_batch=args.max_batch, blur_sigma=args.blur)
    names = [*(args.images or []), *(f"scene:{i}" for i in range(args.scenes))] or ["voc_sample"]
    items = load_probe_images(names)
    with_gt = all(it.has_gt for it in items)
    if not with_gt and any(it.has_gt for it in items):
        p.error("mix of images with and without ground truth: mIoU would cover only some; pass one kind")
    t0 = time.perf_counter()
    rows = readout_study(model, [it.image for it in items], cfg,
                         [it.label for it in items] if with_gt else None,
                         items[0].num_classes if with_gt and len({it.num_classes for it in items}) == 1 else None,
                         [int(v) for v in args.readout_steps.split(",")])
    info = machine_info(model.device)
    print(f"# readout study | {args.model} | res {args.resolution} K {args.k} {args.steps} steps t_m {args.t_m} "
          f"| {info.get('gpu') or info['cpu']} | load {info['load_avg']} | {time.perf_counter() - t0:.0f} s")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, args=vars(args), rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
