"""Seconds per slider change of the inspector: full recompute (before) against the chosen pair first (after).

    python benchmarks/bench_inspector.py                  # reference model, 128 px, K 8, CPU, ~2 minutes
    python benchmarks/bench_inspector.py --threads 2 --repeats 5 --json out.json

Two inspectors on the same model and image, in the same process (Agg backend, so the time is the
kernel's: compute + readout + drawing the figure; the browser's transfer is not in it):

* ``full``: ``Inspector(lazy_labels=False)``, what every change cost before: all 2K (mask, sign)
  runs and the unmodulated run in one batch, then Step D;
* ``lazy``: the default: the chosen segment's pair only (3 batch elements), labels marked stale;
  the ``labels catch-up`` row is the rest of that setting's pairs (``complete_labels``), which the
  kernel runs after the preview is on screen.

Each change moves to a setting not computed before (lambda 10 -> 9.5 -> 9 ..., t_m through the
slider's values below the start), so nothing comes from the cache. Speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import torch  # noqa: E402

from emerdiff import EmerDiff, EmerDiffConfig  # noqa: E402
from emerdiff.evaluation.datasets import load_probe_images  # noqa: E402
from emerdiff.notebook.inspector import Inspector  # noqa: E402
from emerdiff.sd.loading import load_pipeline  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(ins: Inspector, repeats: int, catch_up: bool) -> dict[str, list[float]]:
    """Seconds of ``repeats`` lambda changes and ``repeats`` t_m changes (each to a new setting)."""
    out: dict[str, list[float]] = {"lambda": [], "t_m": [], "catch-up": []}
    lam0 = float(ins.lambda_slider.value)
    for r in range(repeats):
        def move_lambda(r: int = r) -> None:
            ins.lambda_slider.value = lam0 - 0.5 * (r + 1)

        out["lambda"].append(timed(move_lambda))
        if catch_up:
            out["catch-up"].append(timed(ins.complete_labels))
    # down the slider from the start value: every t_m move lands on a setting not computed before
    below = sorted((t for t in ins.timesteps if t < ins.timestep_slider.value), reverse=True)
    for t in below[:repeats]:
        def move_t(t: int = t) -> None:
            ins.timestep_slider.value = t

        out["t_m"].append(timed(move_t))
    assert not ins.errors, ins.errors
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--image", default="scene:100", help="a load_probe_images name")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pipeline(args.model, device="cpu")
    config = EmerDiffConfig.for_model(model, modulation_strength=10.0)
    ed = EmerDiff(model, config)
    image = load_probe_images([args.image])[0].image
    rows = {}
    for name, lazy in (("full", False), ("lazy", True)):
        start = time.perf_counter()
        ins = Inspector(ed, {args.image: image}, lazy_labels=lazy)
        first = time.perf_counter() - start
        rows[name] = dict(measure(ins, args.repeats, catch_up=lazy), first=[first], calls=dict(ins.calls))
    k = ins.num_segments
    print(f"model {args.model} · {config.resolution} px · K {k} · t_m slider {ins.timesteps} · "
          f"threads {torch.get_num_threads()} · load {os.getloadavg()[0]:.2f} · {args.repeats} changes each")
    print("| change | full recompute (s) | chosen pair first (s) | ratio | runs (full / lazy) |")
    print("|---|---|---|---|---|")
    med = {n: {c: statistics.median(v) for c, v in r.items() if c != "calls" and v} for n, r in rows.items()}
    for change in ("lambda", "t_m"):
        f, lz = med["full"][change], med["lazy"][change]
        print(f"| {change} | {f:.2f} | {lz:.2f} | {f / lz:.1f}x | {2 * k} / 2 |")
    print(f"| labels catch-up after a lambda change | - | {med['lazy']['catch-up']:.2f} | - | - / {2 * (k - 1)} |")
    print(f"| first display (prepare + all pairs) | {med['full']['first']:.2f} | {med['lazy']['first']:.2f} | - | "
          f"{2 * k} / {2 * k} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "median": med, "k": k}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
