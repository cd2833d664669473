"""The README's main jobs on the shipped reference model, timed as a new user runs them (issue 29).

    python benchmarks/bench_readme_jobs.py [--scenes 4] [--out benchmarks/readme_jobs.md]

Each job is one fresh `emerdiff` process with its defaults (the thread count is emerdiff.threads' policy, as a
user gets it; the settings line it prints is recorded): `segment` of one 128 px validation scene, `refine` of
the same scene with segment's own low-resolution labels, `evaluate` of ``--scenes`` validation scenes (a folder
dataset written here; 1000 bootstrap resamples, the default), the same with ``--set readout_steps=1`` and
`compare` of the two. Wall seconds of the whole command (interpreter, imports, model load, work, writes), the
load average before and after, the machine. Writes a markdown file that the README's times are checked
against (tests/test_readme.py); never asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_scenes(folder: Path, first: int, n: int) -> Path:
    """A folder dataset (images/, labels/, classes.txt) of validation scenes first..first+n-1."""
    import numpy as np
    from PIL import Image

    from emerdiff.assets.scenes import CLASSES
    from emerdiff.evaluation.datasets import load_probe_images

    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for item in load_probe_images([f"scene:{i}" for i in range(first, first + n)]):
        name = item.name.replace(":", "_")
        Image.fromarray(np.asarray(item.image)).save(folder / "images" / f"{name}.png")
        Image.fromarray(np.asarray(item.label).astype(np.uint8)).save(folder / "labels" / f"{name}.png")
    return folder


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, r.stderr + r.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=4, help="validation scenes for evaluate (from scene 100)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "readme_jobs.md"))
    args = ap.parse_args(argv)
    exe = str(Path(sys.executable).parent / "emerdiff")
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        data = write_scenes(t / "scenes", 100, args.scenes)
        image = data / "images" / "scene_100.png"
        wall, log = timed([exe, "segment", str(image), "--out", str(t / "seg")])
        settings = next((line for line in log.splitlines() if line.startswith("settings for model")), "")
        rows.append(("segment", "emerdiff segment scene_100.png", "1 image", wall))
        import numpy as np
        from PIL import Image

        low = np.load(t / "seg" / "scene_100.npz")["lowres_labels"].astype(np.uint8)
        Image.fromarray(low).save(t / "low.png")
        wall, _ = timed([exe, "refine", str(image), "--masks", str(t / "low.png"), "--out", str(t / "ref")])
        rows.append(("refine", "emerdiff refine scene_100.png --masks low.png", "1 image", wall))
        wall, _ = timed([exe, "evaluate", "--data", str(data), "--out", str(t / "a"), "--quiet"])
        rows.append(("evaluate", "emerdiff evaluate --data scenes --out runs/a", f"{args.scenes} images", wall))
        wall, _ = timed([exe, "evaluate", "--data", str(data), "--out", str(t / "b"), "--quiet",
                         "--set", "readout_steps=1"])
        rows.append(("evaluate (readout_steps=1)", "emerdiff evaluate ... --set readout_steps=1 --out runs/b",
                     f"{args.scenes} images", wall))
        wall, _ = timed([exe, "compare", str(t / "a"), str(t / "b")])
        rows.append(("compare", "emerdiff compare runs/a runs/b", f"{args.scenes} images", wall))
    load1 = os.getloadavg()
    lines = [
        "# The README's jobs, timed (`benchmarks/bench_readme_jobs.py`)",
        "",
        f"{os.cpu_count()}-core {cpu_name()}, load average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at the "
        f"start, {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} at the end (the machine was shared with other "
        "work). Shipped reference model, 128 px validation scenes, every default (threads: the automatic policy). "
        "Wall seconds of the whole command: interpreter start, imports, its own model load, the work, the writes.",
        "",
        f"The settings line segment printed: `{settings}`",
        "",
        "| job | command | input | wall s |",
        "|---|---|---|---|",
        *[f"| {job} | `{cmd}` | {what} | {wall:.1f} |" for job, cmd, what, wall in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
