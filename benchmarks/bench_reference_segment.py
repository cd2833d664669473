"""`emerdiff segment` of one 128 px image on the shipped reference model, as a user runs it: wall seconds
of the whole command (interpreter start, imports, its own model load, the segmentation, the writes), the
segmentation's own compute seconds (the `N segments, X s` it prints: Segmentation.timings['total']) and
the CPU seconds of the process.

    python benchmarks/bench_reference_segment.py [--repeat 3] [--threads 1] [--image scene:100]

``--image``: a file, or a probe name (``scene:100``, ``voc_sample``: written to a temporary PNG first).
Prints a markdown table (median of the repeats) with the load average; never asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def image_file(name: str, folder: Path) -> Path:
    if Path(name).exists():
        return Path(name)
    import numpy as np
    from PIL import Image

    from emerdiff.evaluation.datasets import load_probe_images

    (item,) = load_probe_images([name])
    path = folder / (name.replace(":", "_") + ".png")
    Image.fromarray(np.asarray(item.image)).save(path)
    return path


def run_once(image: Path, out: Path, threads: int, model: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "emerdiff"), "segment", str(image), "--model", model, "--out", str(out),
           "--quiet", "--threads", str(threads)]  # 0: torch's default (one per core)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"emerdiff segment failed: {proc.stderr[-1000:]}")
    m = re.search(r"(\d+) segments, ([0-9.]+) s", proc.stdout)
    return dict(wall=wall, compute=float(m.group(2)), segments=int(m.group(1)),
                cpu=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="--threads of segment; 0: torch's default")
    ap.add_argument("--image", default="scene:100")
    ap.add_argument("--model", default="reference")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        image = image_file(args.image, Path(tmp))
        load0 = os.getloadavg()
        runs = [run_once(image, Path(tmp) / f"out{i}", args.threads, args.model) for i in range(args.repeat)]
        load1 = os.getloadavg()
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "compute", "cpu")}
    print(f"load average {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} at the start, {load1[0]:.2f} / "
          f"{load1[1]:.2f} / {load1[2]:.2f} at the end; {os.cpu_count()} CPUs; median of {args.repeat} runs\n")
    print("| model | image | threads | segments | compute s (segmentation) | wall s (whole command, own model load) "
          "| CPU s (process) | wall - compute s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.image} ({image.name}) | {args.threads or 'default'} | {runs[0]['segments']} | "
          f"{med['compute']:.2f} | {med['wall']:.2f} | {med['cpu']:.2f} | {med['wall'] - med['compute']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
