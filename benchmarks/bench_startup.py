"""CPU start-up of the command line: `emerdiff --help`, a sub-command's --help, `import emerdiff`, against
the interpreter's own start (`python -c pass`), each the median of N fresh processes.

    python benchmarks/bench_startup.py [--repeat 7]
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_startup.py   # another version of the package

Prints a markdown table: median and best wall seconds, the ratio to the `python -c pass` baseline and
whether torch was loaded. On a machine shared with other jobs the ratio is the part to compare; the
load average is printed with it. Never asserts a speed (tests/test_startup.py checks the imports).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CWD = tempfile.mkdtemp(prefix="bench_startup_")  # not the checkout: `python -c` would import ./emerdiff first
BIN = Path(sys.executable).parent

CASES = [
    ("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
    ("import emerdiff", [sys.executable, "-c", "import emerdiff"]),
    ("emerdiff --help", [str(BIN / "emerdiff"), "--help"]),
    ("emerdiff segment --help", [str(BIN / "emerdiff"), "segment", "--help"]),
    ("emerdiff evaluate --help", [str(BIN / "emerdiff"), "evaluate", "--help"]),
    ("emerdiff segment x.png --num-clusters 1 (refused)", [str(BIN / "emerdiff"), "segment", "x.png",
                                                          "--num-clusters", "1"]),
    ("import torch (for scale)", [sys.executable, "-c", "import torch"]),
]


def times(cmd: list[str], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=CWD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def loads_torch(cmd: list[str]) -> bool:
    if cmd[0] == sys.executable:
        code = cmd[2] + "\nimport sys; print('torch' in sys.modules)"
    else:
        code = (f"import sys\nfrom emerdiff.cli import main\ntry:\n    main({cmd[1:]!r})\nexcept SystemExit:\n    pass\n"
                "print('torch' in sys.modules, file=sys.__stdout__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=CWD, capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1:] == ["True"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    rows = []
    base = None
    for name, cmd in CASES:
        ts = times(cmd, args.repeat)
        med = statistics.median(ts)
        base = base or med
        rows.append((name, med, min(ts), med / base, loads_torch(cmd)))
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} at the start, "
          f"{load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} at the end; {os.cpu_count()} CPUs; "
          f"median of {args.repeat} fresh processes\n")
    print("| command | median s | best s | x baseline | torch loaded |")
    print("|---|---|---|---|---|")
    for name, med, best, ratio, torch_loaded in rows:
        print(f"| {name} | {med:.3f} | {best:.3f} | {ratio:.1f}x | {'yes' if torch_loaded else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
