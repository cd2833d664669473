"""Choose the image-guided upsampling baselines' parameters on validation scenes (never the test set).

    python -m training.guided_validation --out runs/guided-validation   # writes OUT/grid.json, OUT/grid.md

Flat-world held-out scenes 100-139 (validation; 0-99 are the test set, 10000+ the confirmation set),
the reference model with ``EmerDiffConfig.for_model("reference")``. Step A runs once per scene; every
grid point only changes the readout of the same segments, so all grid points are scored from one
pass as extra methods of one record per scene. Criterion: the concept protocol's mIoU (the paper's
Table 2 protocol); the rule is in docs/reference/guided_upsampling_validation.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

# The grid, fixed before the run (docs/reference/guided_upsampling_validation.md).
GUIDED_RADII = (2, 4, 8, 12, 16, 24)  # pixels at 128 px
GUIDED_EPS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
BILATERAL_SIGMA_SPACE = (1.0, 2.0, 4.0, 8.0, 12.0, 16.0)  # pixels at 128 px
BILATERAL_SIGMA_COLOR = (0.01, 0.03, 0.1, 0.3, 1.0)
VALIDATION_START, VALIDATION_N = 100, 40


def grid_names() -> dict[str, tuple[str, dict[str, Any]]]:
    """Method name (no '-': reserved for differences) -> (baseline, its parameters), every grid point."""
    names = {}
    for r, e in itertools.product(GUIDED_RADII, GUIDED_EPS):
        names[f"gf_r{r}_eps{e:g}".replace("-", "m")] = ("guided_filter", {"radius": r, "eps": e})
    for s, c in itertools.product(BILATERAL_SIGMA_SPACE, BILATERAL_SIGMA_COLOR):
        names[f"jb_s{s:g}_c{c:g}"] = ("joint_bilateral", {"sigma_space": s, "sigma_color": c})
    return names


def run(out: Path, n: int = VALIDATION_N, start: int = VALIDATION_START) -> dict[str, Any]:
    """Score every grid point on ``n`` validation scenes from ``start``; writes OUT/grid.json and OUT/grid.md."""
    import torch

    from emerdiff.assets.scenes import CLASSES, heldout_scene_seeds, make_scene
    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.protocols import evaluate_records
    from emerdiff.evaluation.records import build_record
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.method.readout import (
        bilinear_upsample,
        guided_filter_upsample,
        joint_bilateral_upsample,
        nearest_upsample,
    )
    from emerdiff.sd.images import to_model_input
    from emerdiff.sd.loading import load_pipeline

    if start < 100 or start + n > 10000:
        raise ValueError(f"scenes {start}..{start + n - 1} are not validation scenes (100-9999); 0-99 are the "
                         "test set and 10000+ the confirmation set: use start >= 100")
    torch.manual_seed(0)
    cfg = EmerDiffConfig.for_model("reference")
    ed = EmerDiff(load_pipeline("reference", device="cpu"), cfg)
    names = grid_names()
    records, t0 = [], time.perf_counter()
    for seed in heldout_scene_seeds(n, start=start):
        scene = make_scene(seed, 128, world="flat")
        prepared = ed.prepare(scene.image)
        segs, size = prepared.segments, prepared.image_size
        guide = (to_model_input(prepared.image, cfg.resolution)[0] + 1) / 2
        extra = {}
        for name, (kind, p) in names.items():
            fn = guided_filter_upsample if kind == "guided_filter" else joint_bilateral_upsample
            extra[name] = fn(segs.features, segs.centroids, prepared.grid, guide, *p.values())
        seg = {"nearest_labels": nearest_upsample(segs.labels, size),
               "bilinear_labels": bilinear_upsample(segs.features, segs.centroids, prepared.grid, size),
               "lowres_labels": segs.labels, "mask_embeddings": segs.mask_embeddings(),
               "query_features": segs.features, "extra_labels": extra}
        records.append(build_record(f"scene_{seed[1]:05d}", seg, scene.labels, len(CLASSES),
                                    methods=("nearest", "bilinear")))
    result = {p: evaluate_records(records, p, len(CLASSES)) for p in ("concept", "majority")}
    rows = []
    for method in ("nearest", "bilinear", *names):
        kind, params = names.get(method, (method, {}))
        rows.append({"method": method, "baseline": kind, **params,
                     **{f"{p}_miou": result[p]["methods"][method]["miou"] for p in result}})
    payload = {"scenes": [start, start + n - 1], "world": "flat", "model": "reference",
               "config": cfg.to_dict(), "seconds": time.perf_counter() - t0, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(payload, indent=2))
    lines = ["| baseline | parameters | concept mIoU | majority mIoU |", "|---|---|---|---|"]
    for row in rows:
        params = ", ".join(f"{k}={row[k]:g}" for k in ("radius", "eps", "sigma_space", "sigma_color") if k in row)
        lines.append(f"| {row['baseline']} | {params} | {row['concept_miou']:.2f} | {row['majority_miou']:.2f} |")
    (out / "grid.md").write_text("\n".join(lines) + "\n")
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.guided_validation", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=VALIDATION_N)
    p.add_argument("--start", type=int, default=VALIDATION_START)
    args = p.parse_args(argv)
    payload = run(Path(args.out), args.n, args.start)
    print((Path(args.out) / "grid.md").read_text(), f"{payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
