"""Run profiles of the study notebooks (``make figures PROFILE=quick|full``) and their expected times.

A profile is a set of notebook parameters applied on top of the notebooks' own defaults (papermill
``-f``; anything in ``FIG_PARAMS``/``-p`` still overrides it). ``full`` is the notebooks as written:
every sweep over the whole schedule. ``quick`` (the default of ``make figures`` and ``emerdiff
figures``) draws the same figures from fewer sweep points: the t_f and t_m sweeps of notebook 02 take
points spread over the schedule instead of every timestep, notebook 01 probes the modulation layers
nearest the paper's, notebook 07 scores fewer validation scenes. Images, settings and figure names are
the same in both.

:data:`ESTIMATES` holds measured seconds per notebook (``benchmarks/bench_figures.py``; the machine
and load are in ``benchmarks/RESULTS.md``), per model kind (:func:`emerdiff.config.model_kind`) and
device type; ``make figures`` prints them (:func:`plan_table`) before it starts. A full-profile entry
not measured end to end is extrapolated from the quick run by the work it sweeps (marked ``~``).

Command line (what the Makefile calls)::

    python -m emerdiff.notebook.profiles plan --profile quick --model reference --device cpu NB.ipynb ...
    python -m emerdiff.notebook.profiles params --profile quick NN_name OUT.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = "quick"

# Notebook parameters per profile; a notebook not named runs with its own defaults.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "01_layer_probe": dict(max_modulation_layers=3),
        # 10 feature timesteps and 6 modulation timesteps spread over the schedule (full: all 50 of each;
        # a t_m sweep point costs one modulated denoising from t_m to x_0)
        "02_timestep_probe": dict(feature_timesteps=10, modulation_timesteps=6),
        "07_evaluation": dict(num_scenes=4),
    },
    "full": {},
}

# Seconds per notebook: ESTIMATES[(model kind, device type)][profile][notebook stem]. A value is
# (seconds, measured): measured False marks an extrapolation (printed with "~").
NOTEBOOK_STEMS = ("00_quickstart", "01_layer_probe", "02_timestep_probe", "03_magnitude_probe",
                  "04_paper_figures", "05_inspector", "06_diagnosis", "07_evaluation")
ESTIMATES: dict[tuple[str, str], dict[str, dict[str, tuple[float, bool]]]] = {
    # reference model on the CPU: CPU seconds of each notebook's papermill run with one torch thread
    # (benchmarks/bench_figures.py -p torch_threads 1, nice 10, on a 2-core Intel Xeon VM at load 2.1-4.8),
    # about the wall time of an idle machine with one thread (two threads on an idle 2-core machine are faster)
    ("reference", "cpu"): {
        "quick": {"00_quickstart": (21.2, True), "01_layer_probe": (39.4, True), "02_timestep_probe": (215.9, True),
                  "03_magnitude_probe": (97.6, True), "04_paper_figures": (59.7, True),
                  "05_inspector": (14.5, True), "06_diagnosis": (178.5, True), "07_evaluation": (58.9, True)},
        # notebooks the quick profile leaves as written are the quick run's numbers; 01 with all 6 cross-attention
        # layers, 02 from one t_m point costing ~5.3 s + ~1.03 s per step after t_m for the 3 images (50 points:
        # 1275 steps, 6 points: 153) and ~0.3 s per t_f point, 07 from ~5.9 s per scene and setting
        "full": {"00_quickstart": (21.2, True), "01_layer_probe": (70.0, False), "02_timestep_probe": (1616.0, False),
                 "03_magnitude_probe": (97.6, True), "04_paper_figures": (59.7, True),
                 "05_inspector": (14.5, True), "06_diagnosis": (178.5, True), "07_evaluation": (106.0, False)},
    },
}
# where and how ESTIMATES were measured (printed under the table)
ESTIMATE_NOTES: dict[tuple[str, str], str] = {
    ("reference", "cpu"): "CPU seconds with one torch thread on a 2-core Intel Xeon VM, benchmarks/RESULTS.md section 9",
}


def check_profile(profile: str) -> str:
    """``profile`` if it is known; else a ValueError naming the profiles."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)} (default: {DEFAULT_PROFILE})")
    return profile


def profile_params(profile: str, notebook: str) -> dict[str, Any]:
    """The parameters ``profile`` sets for ``notebook`` (a stem ``NN_name`` or a path to it)."""
    return dict(PROFILES[check_profile(profile)].get(Path(notebook).stem, {}))


def estimate_key(model: Any, device: str) -> tuple[str, str]:
    """(model kind, device type) of the :data:`ESTIMATES` table: ``'cuda:1'`` is ``'cuda'``."""
    from emerdiff.config import model_kind

    return model_kind(model), str(device).split(":")[0]


def estimates(profile: str, model: Any, device: str) -> dict[str, tuple[float, bool]]:
    """Seconds per notebook stem for ``profile`` on ``model``/``device`` (empty if never measured)."""
    return dict(ESTIMATES.get(estimate_key(model, device), {}).get(check_profile(profile), {}))


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def plan_table(notebooks: Sequence[str], profile: str, model: Any, device: str,
               up_to_date: Iterable[str] = ()) -> str:
    """The table ``make figures`` prints before it starts: each notebook's expected time for this
    profile, model and device, and the total of those that will run (``up_to_date`` stems are skipped)."""
    key = estimate_key(model, device)
    table = estimates(profile, model, device)
    skip = set(up_to_date)
    lines = [f"make figures: profile {profile}, model {model} ({key[0]}), device {device}",
             f"  {'notebook':22s} {'expected':>10s}  params"]
    total, unknown, extrapolated = 0.0, 0, False
    for nb in notebooks:
        stem = Path(nb).stem
        params = profile_params(profile, stem)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(notebook defaults)"
        if stem in skip:
            lines.append(f"  {stem:22s} {'up to date':>10s}  {shown}")
            continue
        value = table.get(stem)
        if value is None:
            unknown += 1
            lines.append(f"  {stem:22s} {'?':>10s}  {shown}")
            continue
        seconds, measured = value
        extrapolated |= not measured
        total += seconds
        lines.append(f"  {stem:22s} {('' if measured else '~') + _fmt(seconds):>10s}  {shown}")
    what = f"{'~' if extrapolated else ''}{_fmt(total)}"
    if unknown:
        what += f" + {unknown} notebook(s) without an estimate"
    lines.append(f"  {'total':22s} {what:>10s}")
    note = ESTIMATE_NOTES.get(key)
    if table:
        lines.append(f"  (estimates: {note}; ~ = extrapolated from the quick run)" if note else "")
    else:
        lines.append(f"  (no estimates for {key[0]} on {key[1]}: benchmarks/bench_figures.py measures them)")
    others = [p for p in sorted(PROFILES) if p != profile]
    lines.append(f"  other profile(s): {', '.join(others)} (make figures PROFILE={others[0]})" if others else "")
    return "\n".join(line for line in lines if line) + "\n"


def stale(notebook: Path, stamp: Path, newer_than: Sequence[Path]) -> bool:
    """True if ``stamp`` is missing or older than the notebook, its ``.py`` source (make regenerates the
    ``.ipynb`` from it first) or any of ``newer_than`` (make's rule)."""
    if not stamp.exists():
        return True
    t = stamp.stat().st_mtime
    return any(p.exists() and p.stat().st_mtime > t for p in [notebook, notebook.with_suffix(".py"), *newer_than])


def write_params(profile: str, notebook: str, path: str | os.PathLike) -> Path:
    """Write ``profile``'s parameters for ``notebook`` as a papermill ``-f`` file (JSON is YAML)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile_params(profile, notebook), indent=1) + "\n")
    return path


def _package_sources() -> list[Path]:
    return sorted(Path(__file__).resolve().parents[1].rglob("*.py"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emerdiff.notebook.profiles",
                                     description="Notebook run profiles: the expected-time table and papermill "
                                     "parameter files (make figures).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print each notebook's expected time and the total")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--profile", default=DEFAULT_PROFILE)
    p.add_argument("--model", default="reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stamps", default=None, help="folder of make's NN_name.stamp files: up-to-date ones are skipped")
    p.add_argument("--params-file", default=None, help="make's params.txt (a newer one makes every notebook stale)")
    q = sub.add_parser("params", help="write a profile's parameters of one notebook (papermill -f file)")
    q.add_argument("notebook")
    q.add_argument("out")
    q.add_argument("--profile", default=DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    try:
        check_profile(args.profile)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "params":
        write_params(args.profile, args.notebook, args.out)
        return 0
    fresh: list[str] = []
    if args.stamps:
        newer = [*_package_sources(), *([Path(args.params_file)] if args.params_file else [])]
        fresh = [Path(nb).stem for nb in args.notebooks
                 if not stale(Path(nb), Path(args.stamps) / f"{Path(nb).stem}.stamp", newer)]
    print(plan_table(args.notebooks, args.profile, args.model, args.device, fresh), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
