"""Held-out evaluation of a model on the scene world, and the locality probe for training.

    # 100 held-out scenes (seeds never used in training), both protocols + open vocabulary
    python -m training.heldout --model reference --n 100 --out runs/reference-eval

writes ``OUT/data`` (images/, labels/, classes.txt), the ordinary
``emerdiff evaluate`` outputs, and ``OUT/results.md``: one table with mIoU of
EmerDiff, bilinear and nearest upsampling and the image-guided upsamplings (guided filter,
joint bilateral) under both protocols, the open-
vocabulary rows of the cross-attention labeller, the mean locality, the boundary metrics, the
colour-edge split (metrics split by whether a GT boundary is a colour edge of the image, issue 26)
and the settings used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.assets import model_world
from emerdiff.assets.scenes import CLASSES, heldout_scene_seeds, make_scene
from emerdiff.evaluation.datasets import write_heldout_folder

__all__ = ["model_world", "write_heldout_folder", "run_heldout", "locality_probe", "learning_curve_probe", "results_table", "main"]

# Settings for the reference model: EmerDiffConfig.for_model("reference") (emerdiff.config.PRESETS).
# The training probes below keep the paper's readout (t_m 281) that their curves were logged with.
PROBE_TIMESTEP = 281
# The preset fields this module's table records (results.json "settings")
TABLE_FIELDS = ("resolution", "num_clusters", "blur_sigma", "max_batch")
# Held-out scenes 0-99 are the test set (this module's table); 100 and up are for validation:
# training monitoring (locality_probe) and the diagnosis notebook explore settings there.
VALIDATION_START = 100


def locality_probe(pipeline_folder: str | Path, step: int, n: int = 4, num_clusters: int = 6,
                   start: int = VALIDATION_START) -> dict[str, float]:
    """Training eval hook on ``n`` validation scenes: mean locality, per-image Hungarian mIoU and
    pixel accuracy (each segment mapped to its majority class) of EmerDiff and nearest upsampling.

    Locality = share of each difference map's energy inside its perturbed
    mask; a readout that ignores the mask scores about the mask's area (~1/K).
    Watch the accuracies more than the mIoU: one-to-one matching with more
    segments than classes rewards segments that vanish from a noisy argmax
    (docs/reference/diagnosis.md). v0 was monitored on test scenes 0-3 (start=0).
    """
    import torch

    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.metrics import hungarian_miou
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import load_pipeline
    from emerdiff.studies.diagnosis import majority_correct

    torch.manual_seed(0)
    world = model_world(pipeline_folder)
    model = load_pipeline(pipeline_folder, device="cpu")
    cfg = EmerDiffConfig.for_model("reference", modulation_timestep=PROBE_TIMESTEP, num_clusters=num_clusters,
                                   kmeans_n_init=2, max_batch=2 * num_clusters + 1)
    seg = EmerDiff(model, cfg)
    loc, scores, acc = [], {"emerdiff": [], "nearest": []}, {"emerdiff": [], "nearest": []}
    for seed in heldout_scene_seeds(n, start=start):
        scene = make_scene(seed, 128, world=world)
        s = seg.segment(scene.image, progress=False)
        loc.append(float(np.mean(s.locality)))
        for name, pred in (("emerdiff", s.labels), ("nearest", s.nearest_labels)):
            scores[name].append(hungarian_miou(pred, scene.labels, len(CLASSES)))
            acc[name].append(float(majority_correct(pred, scene.labels).mean()))
    return {"locality": float(np.mean(loc)), "chance_locality": 1.0 / num_clusters,
            **{f"miou_{k}": float(np.mean(v)) for k, v in scores.items()},
            **{f"acc_{k}": float(np.mean(v)) for k, v in acc.items()}}


# Readouts the learning curve follows beside the paper's (t_m 281, 15 steps after it):
# a shorter path after the perturbation kept more locality on v0/v1 (docs/reference/diagnosis.md).
CURVE_READOUTS: dict[str, dict[str, Any]] = {"t_m=81": {"modulation_timestep": 81}, "readout_steps=1": {"readout_steps": 1}}


def learning_curve_probe(pipeline_folder: str | Path, step: int, n: int = 8, start: int = VALIDATION_START,
                         config: dict[str, Any] | None = None,
                         readouts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Training eval hook for reference v2, on ``n`` validation scenes of the model's world.

    Logs locality at each stage of the paper readout (after the modulated call, after
    the later denoising steps, decoded; chance = mean mask area) and majority-mapped pixel
    accuracy of EmerDiff (paper readout and :data:`CURVE_READOUTS`), nearest and bilinear
    upsampling of the same K = 8 segments. Majority-mapped accuracy, not per-image
    Hungarian mIoU, is what says whether EmerDiff beats upsampling here
    (docs/reference/diagnosis.md). ``config`` overrides the reference preset's fields and
    ``readouts`` replaces :data:`CURVE_READOUTS` (tests use both on the tiny model).
    """
    import torch

    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.datasets import ProbeImage
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.method.readout import bilinear_upsample
    from emerdiff.sd.loading import load_pipeline
    from emerdiff.studies.diagnosis import label_moves, locality_by_stage, majority_correct
    from emerdiff.studies.probes import with_config

    torch.manual_seed(0)
    world = model_world(pipeline_folder)
    ed = EmerDiff(load_pipeline(pipeline_folder, device="cpu"),
                  EmerDiffConfig.for_model("reference", **{"modulation_timestep": PROBE_TIMESTEP, **(config or {})}))
    readouts = CURVE_READOUTS if readouts is None else readouts
    variants = {name: with_config(ed, **changes) for name, changes in readouts.items()}
    t_stop = max([ed.config.modulation_timestep, *(v.config.modulation_timestep for v in variants.values())])
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(float(value))

    for seed in heldout_scene_seeds(n, start=start):
        scene = make_scene(seed, 128, world=world)
        item = ProbeImage(f"scene_{seed[1]}", scene.image, scene.labels, len(CLASSES))
        prepared = ed.prepare(scene.image, t_stop=t_stop)
        stages = locality_by_stage(ed, prepared)
        for stage in ("modulated_call", "denoised_latent", "decoded", "chance"):
            add(f"locality_{stage}", stages[stage])
        moves = label_moves(ed, prepared, stages["maps"]["decoded"], item)
        add("acc_emerdiff", moves["acc_emerdiff_all"])
        add("acc_nearest", moves["acc_nearest_all"])
        segs = prepared.segments
        bilinear = bilinear_upsample(segs.features, segs.centroids, prepared.grid, prepared.image_size)
        add("acc_bilinear", majority_correct(bilinear, scene.labels).mean())
        for name, variant in variants.items():
            maps, _ = variant.perturb(prepared)
            add(f"acc_emerdiff_{name}", label_moves(variant, prepared, maps, item)["acc_emerdiff_all"])
    return {"world": world, "scenes": n, **{k: float(np.mean(v)) for k, v in rows.items()}}


def results_table(rows: list[dict[str, Any]], settings: dict[str, Any],
                  intervals: dict[str, dict[str, dict[str, float]]] | None = None,
                  boundary: dict[str, dict[str, dict[str, dict[str, float]]]] | None = None,
                  boundary_settings: dict[str, Any] | None = None,
                  colour_split: dict[str, Any] | None = None) -> str:
    """Markdown table of evaluation rows (from results.json files); with ``intervals``
    (:func:`emerdiff.evaluation.bootstrap.bootstrap_protocols`) a 95 % interval column and a second table
    of EmerDiff's differences to each baseline; with ``boundary``
    (:func:`emerdiff.evaluation.bootstrap.bootstrap_with_boundaries`) the boundary metrics after those
    (:func:`boundary_table`), every earlier line unchanged; with ``colour_split`` (results.json's
    ``colour_edge_split``, :func:`emerdiff.evaluation.colour_edges.colour_edge_split`) its table after those."""
    intervals = intervals or {}
    lines = ["| protocol | method | mIoU | 95 % interval | pixel acc. | locality |", "|---|---|---|---|---|---|"]
    for row in rows:
        loc = "" if row.get("locality") is None else f"{row['locality']:.3f}"
        ci = intervals.get(row["protocol"], {}).get(row["method"])
        span = f"[{ci['lo']:.1f}, {ci['hi']:.1f}]" if ci else ""
        lines.append(f"| {row['protocol']} | {row['method']} | {row['miou']:.1f} | {span} | "
                     f"{row['pixel_accuracy']:.1f} | {loc} |")
    listed = {row["protocol"] for row in rows}
    for protocol, per in intervals.items():  # protocols scored by the bootstrap alone (the oracle "majority")
        if protocol not in listed:
            lines += [f"| {protocol} | {m} | {v['value']:.1f} | [{v['lo']:.1f}, {v['hi']:.1f}] |  |  |"
                      for m, v in per.items() if "-" not in m]
    diffs = [(p, name, v) for p, per in intervals.items() for name, v in per.items() if "-" in name]
    if diffs:
        lines += ["", "| protocol | difference (mIoU) | value | 95 % interval | excludes 0 |", "|---|---|---|---|---|"]
        for protocol, name, v in diffs:
            excludes = "yes" if v["lo"] > 0 or v["hi"] < 0 else "no"
            lines.append(f"| {protocol} | {name.replace('-', ' - ')} | {v['value']:+.1f} | "
                         f"[{v['lo']:+.1f}, {v['hi']:+.1f}] | {excludes} |")
    if boundary:
        lines += ["", *boundary_table(boundary, boundary_settings or {})]
    if colour_split:
        from emerdiff.evaluation.colour_edges import split_table

        lines += ["", *split_table(colour_split)]
    lines.append("")
    lines.append("settings: " + json.dumps(settings, sort_keys=True))
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _span(v: dict[str, float], spec: str) -> str:
    return "" if not np.isfinite(v.get("lo", np.nan)) else f"[{v['lo']:{spec}}, {v['hi']:{spec}}]"


def boundary_table(boundary: dict[str, dict[str, dict[str, dict[str, float]]]], settings: dict[str, Any]) -> list[str]:
    """Markdown lines of the boundary metrics (``{protocol: {metric: {method or "a-b": interval}}}``): per
    protocol x method Boundary IoU and boundary F with 95 % intervals and the trimap IoU curve, then
    EmerDiff's paired differences to every other method in both (results.json holds every pair)."""
    widths = [name[len("trimap_iou_"):] for name in next(iter(boundary.values())) if name.startswith("trimap_iou_")]
    band, tol = settings.get("band_px", settings.get("band")), settings.get("tolerance_px", settings.get("tolerance"))
    lines = [f"Boundary metrics of each protocol's labelling of the label maps (Boundary IoU at d = {band} px, "
             f"boundary F at {tol} px, trimap IoU within w px of a GT boundary):", "",
             f"| protocol | method | boundary IoU | 95 % interval | boundary F | 95 % interval | "
             f"trimap IoU at {' / '.join(widths)} px |", "|---|---|---|---|---|---|---|"]
    for protocol, per in boundary.items():
        for m, biou in per["boundary_iou"].items():
            if "-" in m:
                continue
            bf = per["boundary_f"][m]
            curve = " / ".join(_fmt(per[f"trimap_iou_{w}"][m]["value"], ".1f") for w in widths)
            lines.append(f"| {protocol} | {m} | {_fmt(biou['value'], '.1f')} | {_span(biou, '.1f')} | "
                         f"{_fmt(bf['value'], '.1f')} | {_span(bf, '.1f')} | {curve} |")
    lines += ["", "| protocol | difference (boundary) | boundary IoU | 95 % interval | boundary F | 95 % interval |",
              "|---|---|---|---|---|---|"]
    for protocol, per in boundary.items():
        for name, biou in per["boundary_iou"].items():
            if name.startswith("emerdiff-"):
                bf = per["boundary_f"][name]
                lines.append(f"| {protocol} | {name.replace('-', ' - ')} | {_fmt(biou['value'], '+.1f')} | "
                             f"{_span(biou, '+.1f')} | {_fmt(bf['value'], '+.1f')} | {_span(bf, '+.1f')} |")
    return lines


def heldout_bootstrap(evaluate_dir: str | Path, n: int, n_boot: int = 1000, start: int = 0,
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Bootstrap intervals over the ``n`` held-out scenes (from index ``start``) of an ``evaluate`` output
    folder, every protocol and the oracle ``majority``: ``(mIoU intervals, boundary metrics' intervals,
    boundary settings)``, on the same resamples (:func:`emerdiff.evaluation.bootstrap.bootstrap_with_boundaries`)."""
    from emerdiff.evaluation.bootstrap import bootstrap_with_boundaries
    from emerdiff.evaluation.boundary import BoundaryMetrics
    from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS
    from emerdiff.evaluation.records import load_maps, load_record, record_path

    ids = [f"scene_{seed[1]:05d}" for seed in heldout_scene_seeds(n, start)]
    paths = [record_path(Path(evaluate_dir), i) for i in ids]
    records = [load_record(path, i) for path, i in zip(paths, ids)]
    maps = [load_maps(path, i) for path, i in zip(paths, ids)]
    metrics = BoundaryMetrics()
    # the oracle "majority" protocol too: the readout's label map apart from any mask labelling
    miou, boundary = bootstrap_with_boundaries(records, maps, len(CLASSES), n_boot=n_boot, protocols=KNOWN_PROTOCOLS,
                                               metrics=metrics)
    return miou, boundary, metrics.settings(maps[0]["gt"].shape)


def heldout_intervals(evaluate_dir: str | Path, n: int, n_boot: int = 1000, start: int = 0) -> dict[str, Any]:
    """The mIoU intervals of :func:`heldout_bootstrap`."""
    return heldout_bootstrap(evaluate_dir, n, n_boot, start)[0]


def run_heldout(model: str, out: str | Path, n: int = 100, start: int = 0, world: str | None = None,
                k: int | None = None, device: str | None = None, dtype: str | None = None, quiet: bool = False,
                changes: dict[str, Any] | None = None, openvocab: bool = True, bootstrap: int = 1000,
                set_items: list[str] | None = None) -> str:
    """The held-out table of ``model`` on ``n`` scenes from ``start``: writes ``OUT/data``, ``OUT/evaluate``
    (the evaluation runner's outputs), ``OUT/results.json`` and ``OUT/results.md``; returns the table.

    The config is the reference preset's table settings (:data:`TABLE_FIELDS`) on the model's preset,
    then ``k`` (num_clusters) and ``changes`` (EmerDiffConfig fields). ``set_items``: how the changes
    are named in the table's settings line (default ``FIELD=JSON`` of each change).
    """
    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.runner import run_evaluation

    reference = EmerDiffConfig.for_model("reference")
    out = Path(out)
    changes = dict(changes or {})
    k = reference.num_clusters if k is None else k
    world = world or model_world(model)
    data = write_heldout_folder(out / "data", n, start=start, world=world)
    config = EmerDiffConfig.for_model(model, **{**{name: getattr(reference, name) for name in TABLE_FIELDS},
                                                "num_clusters": k, **changes})
    # One per-image cache for both runs, filled by the first (open vocabulary needs the
    # segmentation too, so it goes first and the mask protocols then only merge). Each run
    # rewrites results.json, so rows are collected in between.
    rows = []
    for protocol in (["openvocab"] if openvocab else []) + ["all"]:
        payload = run_evaluation(data, model, config, out / "evaluate", protocols=protocol, labeller="unet",
                                 n_boot=bootstrap, device=device, dtype=dtype, quiet=quiet, layout="folder")
        rows += payload["rows"]
    colour_split = payload.get("colour_edge_split")  # the mask protocols' run: majority labelling, same resamples
    if set_items is None:
        set_items = [f"{name}={json.dumps(value)}" for name, value in changes.items()]
    settings = {"model": model, "world": world, "scenes": n, "first_scene": start, "k": k,
                **{name: getattr(reference, name) for name in TABLE_FIELDS},
                "set": list(set_items), "device": device, "dtype": dtype}
    intervals, boundary, boundary_settings = heldout_bootstrap(out / "evaluate", n, n_boot=bootstrap, start=start)
    (out / "results.json").write_text(json.dumps({"rows": rows, "settings": settings, "intervals": intervals,
                                                  "boundary_intervals": boundary,
                                                  "boundary_settings": boundary_settings,
                                                  "colour_edge_split": colour_split}, indent=2))
    table = results_table(rows, settings, intervals, boundary, boundary_settings, colour_split)
    (out / "results.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    from emerdiff.cli.options import parse_sets
    from emerdiff.config import EmerDiffConfig

    reference = EmerDiffConfig.for_model("reference")
    p = argparse.ArgumentParser(prog="python -m training.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference", help="model to evaluate (default: reference)")
    p.add_argument("--n", type=int, default=100, help="held-out scenes (default 100)")
    p.add_argument("--start", type=int, default=0,
                   help=f"first scene index: 0 = the test scenes (default); {VALIDATION_START} = validation "
                        "scenes, for choosing a model or readout without looking at the test scenes")
    p.add_argument("--out", required=True)
    p.add_argument("--world", default=None, choices=["textured", "flat"],
                   help="scene world (default: the one the model was trained on, from its reference.json)")
    p.add_argument("--num-clusters", "--k", dest="k", type=int, default=reference.num_clusters,
                   help="num_clusters, K of Step A (default: the reference preset's %(default)s)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="other config fields")
    p.add_argument("--no-openvocab", action="store_true", help="skip the open-vocabulary rows")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples of the 95 %% interval over scenes of each mIoU (default 1000)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.bootstrap < 100:
        p.error(f"--bootstrap {args.bootstrap}: use at least 100 resamples (default 1000)")
    try:
        changes = parse_sets(args.set)
    except ValueError as err:
        p.error(str(err))
    table = run_heldout(args.model, out, n=args.n, start=args.start, world=args.world, k=args.k,
                        device=args.device, dtype=args.dtype, quiet=args.quiet, changes=changes,
                        openvocab=not args.no_openvocab, bootstrap=args.bootstrap, set_items=args.set)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
