"""Time every study notebook as `make figures` runs it (papermill), per notebook, for one profile.

    python benchmarks/bench_figures.py --profile quick --model reference --device cpu [--only 00 02] [--json F]

Each notebook runs in its own papermill process (the profile's parameter file, then model, device and
a temporary output folder, as the Makefile passes them). Columns: wall seconds, CPU seconds of the
papermill process and its kernel (user + system, children included: on a machine shared with other
jobs this is the load-independent part; on an idle machine with one torch thread the wall time is
about this), and the load average before and after. The numbers feed
``emerdiff.notebook.profiles.ESTIMATES``. Prints a markdown table; never asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emerdiff.notebook.profiles import DEFAULT_PROFILE, PROFILES, write_params  # noqa: E402


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(nb: Path, profile: str, model: str, device: str, out: Path, extra: list[tuple[str, str]],
            kernel: str) -> dict:
    params = write_params(profile, nb.stem, out / f"{nb.stem}.params.yaml")
    cmd = [sys.executable, "-m", "papermill", "--kernel", kernel, "--log-level", "WARNING", str(nb),
           str(out / nb.name), "-f", str(params), "-p", "model", model, "-p", "device", device,
           "-p", "output_dir", str(out / "figures")]
    for name, value in extra:
        cmd += ["-p", name, value]
    load0 = os.getloadavg()[0]
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    row = dict(notebook=nb.stem, profile=profile, model=model, device=device, wall_s=round(wall, 1),
               cpu_s=round(cpu, 1), load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2),
               ok=proc.returncode == 0)
    if proc.returncode:
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| notebook | profile | model | device | wall s | CPU s | load start | load end | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['notebook']} | {r['profile']} | {r['model']} | {r['device']} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['load_start']:.2f} | {r['load_end']:.2f} | {'yes' if r['ok'] else 'FAILED'} |")
    ok = [r for r in rows if r["ok"]]
    lines.append(f"| total | | | | {sum(r['wall_s'] for r in ok):.1f} | {sum(r['cpu_s'] for r in ok):.1f} | | | "
                 f"{len(ok)}/{len(rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    ap.add_argument("--model", default="reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="notebook name prefixes (default: all)")
    ap.add_argument("--notebooks", default=str(ROOT / "notebooks"))
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="extra papermill parameter for every notebook (e.g. -p torch_threads 1)")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel (default: emerdiff if registered, else python3)")
    ap.add_argument("--out", default=None, help="keep the executed notebooks and figures here (default: temporary)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    from emerdiff.cli.app import jupyter_kernel

    kernel = args.kernel or jupyter_kernel("emerdiff")
    notebooks = sorted(Path(args.notebooks).glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for nb in notebooks:
            row = run_one(nb, args.profile, args.model, args.device, out, [tuple(p) for p in args.param], kernel)
            rows.append(row)
            print(f"{row['notebook']}: wall {row['wall_s']} s, CPU {row['cpu_s']} s, load {row['load_start']}"
                  f"->{row['load_end']}{'' if row['ok'] else ' FAILED: ' + row['error'][-500:]}",
                  file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows), end="")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
