"""Choose a readout on validation scenes, then score that one alone on the test scenes (issue 13's bar).

    python -m training.readout_sweep --model v2=reference --model b=runs/b1400 \\
        --device cuda --workers 12 --budget 540 --out runs/sweep

Every setting is one held-out run (:func:`training.heldout.run_heldout`; own worker process, own folder) on the
validation scenes (default 200 scenes from index 100, never the test scenes 0-99), several at a
time. Three phases, each built from the results of the one before:

1. one knob at a time around the shipped readout (:data:`BASE`), on the first model;
2. the factorial of each numeric knob's two best values (blur and injection: the best one);
3. the best settings of the first model on every other model.

Selection (fixed before any run): the largest *margin*, the smallest of EmerDiff's four leads
that the bar counts (dataset Hungarian and concept mIoU, over nearest and over bilinear
upsampling of the same segments; :func:`bar_summary`). Then the chosen setting, and the shipped
one as a reference point, run on the test scenes with 1000 bootstrap resamples.

Writes ``OUT/sweep.md`` and ``OUT/sweep.json`` (every setting, its leads and margin, ranked; the
test runs last) and one heldout folder per run under ``OUT/validation`` and ``OUT/test``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from training.heldout import VALIDATION_START

__all__ = ["BASE", "PHASE1_VALUES", "BAR_PROTOCOLS", "BAR_BASELINES", "BAR_MIOU", "bar_summary", "setting_name",
           "heldout_run", "phase1_settings", "phase2_settings", "rank", "sweep_figure", "main"]

# The shipped readout of the reference model (emerdiff.config's "reference" sizes).
BASE: dict[str, Any] = dict(modulation_timestep=81, modulation_strength=10.0, readout_steps=None, num_clusters=8,
                            blur_sigma=1.0, attention_injection=True, assign_radius=None)
# Phase 1: each knob moved alone. t_m must lie on the 50-step schedule (1, 21, 41, ...).
PHASE1_VALUES: dict[str, list[Any]] = {
    "modulation_timestep": [41, 61, 101, 141, 201, 281],
    "modulation_strength": [2.5, 5.0, 20.0, 40.0],
    "readout_steps": [1, 2],
    "num_clusters": [5, 6, 10, 12],
    "blur_sigma": [0.5, 2.0],
    "attention_injection": [False],
    "assign_radius": [1, 2],
}
# Knobs whose two best values enter phase 2's factorial; the others take their best value.
FACTORIAL_KNOBS = ("modulation_timestep", "modulation_strength", "readout_steps", "num_clusters")
BAR_PROTOCOLS = ("dataset_hungarian", "concept")
BAR_BASELINES = ("nearest", "bilinear")
BAR_MIOU = 2.0
_SHORT = {"modulation_timestep": "t", "modulation_strength": "l", "readout_steps": "rs", "num_clusters": "k",
          "blur_sigma": "b", "attention_injection": "inj", "assign_radius": "r"}


def bar_summary(intervals: Mapping[str, Any]) -> dict[str, Any]:
    """EmerDiff's leads that issue 13's bar counts, from a heldout ``results.json``'s ``intervals``.

    Returns ``{"leads": {"dataset_hungarian-nearest": {value, lo, hi}, ...}, "margin": the smallest
    lead, "met": every lead >= BAR_MIOU with its 95 % interval above 0}``.
    """
    leads = {}
    for protocol in BAR_PROTOCOLS:
        if protocol not in intervals:
            raise KeyError(f"results hold no {protocol!r} intervals; run heldout with the mask protocols ('all')")
        for baseline in BAR_BASELINES:
            v = intervals[protocol][f"emerdiff-{baseline}"]
            leads[f"{protocol}-{baseline}"] = {k: float(v[k]) for k in ("value", "lo", "hi")}
    margin = min(v["value"] for v in leads.values())
    met = all(v["value"] >= BAR_MIOU and v["lo"] > 0 for v in leads.values())
    return {"leads": leads, "margin": margin, "met": met}


def setting_name(model: str, knobs: Mapping[str, Any]) -> str:
    """A folder name that says what the setting is, e.g. ``v2_t81_l10_rsall_k8_b1_inj1_rall``."""
    parts = [model]
    for key, short in _SHORT.items():
        if key not in knobs:  # a knob added after a run was named (older sweeps)
            continue
        v = knobs[key]
        v = "all" if v is None else int(v) if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else v
        parts.append(f"{short}{v}")
    return "_".join(parts)


def heldout_run(model_path: str, knobs: Mapping[str, Any], out: str | Path, n: int, start: int,
                device: str | None, dtype: str | None, bootstrap: int, log: str | Path | None = None) -> int:
    """One setting: :func:`training.heldout.run_heldout` on ``n`` scenes from ``start`` (mask protocols
    only), its printed output in ``log``; returns 0. Module-level so that a worker process can run it."""
    from contextlib import redirect_stderr, redirect_stdout

    from training.heldout import run_heldout

    with open(log or os.devnull, "a") as stream, redirect_stdout(stream), redirect_stderr(stream):
        print(run_heldout(model_path, out, n=n, start=start, k=knobs["num_clusters"], device=device, dtype=dtype,
                          quiet=True, changes={k: v for k, v in knobs.items() if k != "num_clusters"},
                          openvocab=False, bootstrap=bootstrap))
    return 0


def phase1_settings(base: Mapping[str, Any] = BASE,
                    values: Mapping[str, Sequence[Any]] = PHASE1_VALUES) -> list[dict[str, Any]]:
    """The base setting, then each knob moved alone to each of its values."""
    out = [dict(base)]
    for key, vals in values.items():
        out += [{**base, key: v} for v in vals if v != base[key]]
    return out


def rank(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Completed results, best margin first (ties: the earlier run)."""
    done = [r for r in results if r.get("summary")]
    return sorted(done, key=lambda r: -r["summary"]["margin"])


def phase2_settings(results: Sequence[Mapping[str, Any]], base: Mapping[str, Any] = BASE,
                    factorial_knobs: Sequence[str] = FACTORIAL_KNOBS) -> list[dict[str, Any]]:
    """From phase-1 results (each ``{"knobs", "summary"}``): per knob the values ranked by the margin of
    the run that moved that knob alone (the base run counts for the base value); the factorial of the
    two best values of each factorial knob, the best value of every other knob."""
    ranked = rank(results)
    best: dict[str, list[Any]] = {}
    for key in base:
        vals = []
        for r in ranked:
            moved = [k for k in base if r["knobs"][k] != base[k]]
            if moved in ([], [key]) and r["knobs"][key] not in vals:
                vals.append(r["knobs"][key])
        best[key] = vals or [base[key]]
    keys = list(base)
    choices = [best[k][:2] if k in factorial_knobs else best[k][:1] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]


def _worker(job: dict[str, Any], log: str) -> None:
    """A worker process's run: one BLAS / OpenMP thread (the workers share the cores), then :func:`heldout_run`."""
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        heldout_run(**job, log=log)
    except BaseException:
        import traceback

        with open(log, "a") as stream:
            traceback.print_exc(file=stream)
        raise SystemExit(1) from None


class _Runner:
    """Runs heldout settings in worker processes, a few at a time, each with the time left before a deadline."""

    def __init__(self, root: Path, workers: int, n: int, start: int, device: str | None, dtype: str | None,
                 bootstrap: int, deadline: float, min_seconds: float):
        self.root, self.workers, self.n, self.start = root, workers, n, start
        self.device, self.dtype, self.bootstrap = device, dtype, bootstrap
        self.deadline, self.min_seconds = deadline, min_seconds
        self.results: dict[str, dict[str, Any]] = {}

    def _launch(self, job: dict[str, Any], log: Path, seconds: float) -> int | None:
        """One heldout run: 0 when done, 1 when it failed, None when stopped after ``seconds``."""
        if self.workers == 0:  # in this process, one after another (a run is not stopped at the deadline)
            return heldout_run(**job, log=log)
        # its own process (spawned: torch must not inherit this process's threads), stopped at the deadline
        proc = multiprocessing.get_context("spawn").Process(target=_worker, args=(job, str(log)))
        proc.start()
        proc.join(seconds)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            return None
        return proc.exitcode
    def _one(self, model: str, path: str, knobs: dict[str, Any]) -> dict[str, Any]:
        name = setting_name(model, knobs)
        out = self.root / name
        rec: dict[str, Any] = {"name": name, "model": model, "model_path": path, "knobs": knobs}
        done = out / "results.json"
        if not done.exists():  # an earlier call's run is reused (resume)
            left = self.deadline - time.time()
            if left < self.min_seconds:
                rec["skipped"] = "no time left"
                return rec
            job = dict(model_path=path, knobs=knobs, out=out, n=self.n, start=self.start, device=self.device,
                       dtype=self.dtype, bootstrap=self.bootstrap)
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.txt").write_text("")
            t0 = time.time()
            rec["returncode"] = self._launch(job, out / "log.txt", left)
            if rec["returncode"] is None:
                rec["skipped"] = f"stopped at the deadline after {time.time() - t0:.0f} s"
                return rec
            rec["seconds"] = round(time.time() - t0, 1)
            if not done.exists():
                rec["error"] = (out / "log.txt").read_text()[-2000:]
                return rec
        results = json.loads(done.read_text())
        rec["summary"] = bar_summary(results["intervals"])
        rec["miou"] = {p: {m: v["value"] for m, v in iv.items() if "-" not in m}
                       for p, iv in results["intervals"].items()}
        return rec

    def run(self, jobs: Sequence[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
        todo = [(m, p, k) for m, p, k in jobs if setting_name(m, k) not in self.results]
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for rec in pool.map(lambda j: self._one(*j), todo):
                self.results[rec["name"]] = rec
                status = (f"margin {rec['summary']['margin']:+.2f}" if rec.get("summary")
                          else rec.get("skipped") or "FAILED")
                print(f"[{time.strftime('%H:%M:%S')}] {rec['name']}: {status} ({rec.get('seconds', '-')} s)",
                      flush=True)
        return [self.results[setting_name(m, k)] for m, p, k in jobs]


def _fmt(v: dict[str, float]) -> str:
    return f"{v['value']:+.1f} [{v['lo']:+.1f}, {v['hi']:+.1f}]"


def sweep_table(results: Sequence[Mapping[str, Any]], title: str) -> str:
    """Markdown: one row per completed setting, best margin first."""
    keys = [f"{p}-{b}" for p in BAR_PROTOCOLS for b in BAR_BASELINES]
    lines = [f"## {title}", "", "| rank | setting | EmerDiff dataset H. | EmerDiff concept | "
             + " | ".join(k.replace("dataset_hungarian", "dataset H.") for k in keys) + " | margin | bar met |",
             "|" + "---|" * (6 + len(keys))]
    for i, r in enumerate(rank(results), 1):
        s = r["summary"]
        lines.append(f"| {i} | {r['name']} | {r['miou']['dataset_hungarian']['emerdiff']:.1f} | "
                     f"{r['miou']['concept']['emerdiff']:.1f} | " + " | ".join(_fmt(s["leads"][k]) for k in keys)
                     + f" | {s['margin']:+.2f} | {'yes' if s['met'] else 'no'} |")
    missing = [r["name"] + ": " + (r.get("skipped") or "failed") for r in results if not r.get("summary")]
    if missing:
        lines += ["", "Not completed: " + "; ".join(missing)]
    return "\n".join(lines) + "\n"


def sweep_figure(results: Sequence[Mapping[str, Any]], base: Mapping[str, Any] = BASE, model: str | None = None,
                 title: str | None = None) -> Any:
    """One panel per knob: EmerDiff's four bar leads (95 % intervals) at each value the knob took
    while every other knob stayed at ``base`` (phase 1), the base value marked, and the bar
    (+BAR_MIOU) and 0 as lines. ``model``: that model's runs only (default: the first run's)."""
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("summary")]
    if not done:
        raise ValueError("no completed runs to plot")
    model = model or done[0]["model"]
    done = [r for r in done if r["model"] == model]
    keys = [f"{p}-{b}" for p in BAR_PROTOCOLS for b in BAR_BASELINES]
    fig, axes = plt.subplots(2, (len(base) + 1) // 2, figsize=(4.2 * ((len(base) + 1) // 2), 7), squeeze=False)
    for ax, knob in zip(axes.flat, base, strict=False):
        runs = [r for r in done if knob in r["knobs"]
                and all(r["knobs"].get(k, base[k]) == base[k] for k in base if k != knob)]
        runs.sort(key=lambda r: (r["knobs"][knob] is None, r["knobs"][knob]))
        xs = range(len(runs))
        for j, key in enumerate(keys):
            leads = [r["summary"]["leads"][key] for r in runs]
            v = [x["value"] for x in leads]
            err = [[x["value"] - x["lo"] for x in leads], [x["hi"] - x["value"] for x in leads]]
            ax.errorbar([x + (j - 1.5) * 0.1 for x in xs], v, yerr=err, fmt="o-", ms=4, capsize=2,
                        label=key.replace("dataset_hungarian", "dataset H.").replace("-", " - "))
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(BAR_MIOU, color="r", lw=0.8, ls="--")
        labels = ["all" if r["knobs"][knob] is None else f"{r['knobs'][knob]:g}" if not isinstance(
            r["knobs"][knob], bool) else str(r["knobs"][knob]) for r in runs]
        ax.set_xticks(list(xs), [f"[{t}]" if r["knobs"][knob] == base[knob] else t for t, r in zip(labels, runs)])
        ax.set_title(knob)
        ax.set_ylabel("EmerDiff lead (mIoU)")
    for ax in list(axes.flat)[len(base):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(keys), fontsize=8)
    fig.suptitle(title or f"{model}: one knob at a time around the base [bracketed]; red: the bar (+{BAR_MIOU:g})")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.readout_sweep",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model to sweep (repeatable; the first gets phases 1 and 2), e.g. v2=reference")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=200, help="validation scenes (default 200)")
    p.add_argument("--start", type=int, default=VALIDATION_START,
                   help=f"first validation scene (default {VALIDATION_START}; must not overlap the test scenes)")
    p.add_argument("--test-n", type=int, default=100, help="test scenes 0..N-1 for the chosen setting (0: none)")
    p.add_argument("--workers", type=int, default=2,
                   help="settings evaluated at a time, each in its own process; 0: one after another in this "
                        "process (no start-up cost; a run is not stopped at the deadline)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", help="weights dtype of every run (default float32, as on CPU)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the validation runs (test: 1000)")
    p.add_argument("--budget", type=float, default=3600.0, help="seconds for the whole sweep, test included")
    p.add_argument("--test-reserve", type=float, default=120.0, help="seconds of the budget kept for the test runs")
    p.add_argument("--grid", action="append", default=[], metavar="KNOB=JSON_LIST",
                   help="phase 1's values of a knob, e.g. --grid modulation_timestep=[61,101] (repeatable; "
                        "given, only the named knobs move; default: PHASE1_VALUES)")
    p.add_argument("--transfer", type=int, default=3, help="best settings of the first model tried on the others")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.start < args.test_n:
        p.error(f"--start {args.start} overlaps the test scenes 0..{args.test_n - 1}; validation starts at "
                f"{VALIDATION_START}")
    grid: dict[str, list[Any]] = {}
    for item in args.grid:
        key, sep, value = item.partition("=")
        try:
            vals = json.loads(value)
        except json.JSONDecodeError:
            vals = None
        if not sep or key not in BASE or not isinstance(vals, list):
            p.error(f"--grid expects KNOB=JSON_LIST with KNOB one of {list(BASE)}, got {item!r} "
                    "(e.g. --grid modulation_strength=[5,20])")
        grid[key] = vals
    models = []
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--model expects NAME=PATH, got {item!r} (e.g. --model v2=reference)")
        models.append((name, path))
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    val = _Runner(root / "validation", args.workers, args.n, args.start, args.device, args.dtype, args.bootstrap,
                  t0 + args.budget - args.test_reserve, min_seconds=20)
    (first, first_path), others = models[0], models[1:]
    phase1 = val.run([(first, first_path, k) for k in phase1_settings(BASE, grid or PHASE1_VALUES)])
    phase2 = val.run([(first, first_path, k) for k in phase2_settings(phase1)])
    top = [r["knobs"] for r in rank(phase1 + phase2)[:args.transfer]]
    val.run([(m, mp, k) for m, mp in others for k in top])
    everything = list(val.results.values())
    ranked = rank(everything)
    report = {"settings": vars(args), "base": BASE, "selection": "largest margin (smallest of the four bar leads)",
              "validation": everything, "chosen": ranked[0]["name"] if ranked else None}
    md = [f"# Readout sweep: {args.n} validation scenes from {args.start}\n",
          f"Selection: the largest margin = min of EmerDiff's leads (dataset Hungarian, concept) x (nearest, "
          f"bilinear). Base: {setting_name(first, BASE)}.\n", sweep_table(everything, "Validation")]
    if ranked and args.test_n:
        chosen = ranked[0]
        test = _Runner(root / "test", min(args.workers, 2), args.test_n, 0, args.device, args.dtype, 1000, t0 + args.budget,
                       min_seconds=10)
        jobs = [(chosen["model"], chosen["model_path"], chosen["knobs"])]
        if setting_name(first, BASE) != chosen["name"]:
            jobs.append((first, first_path, dict(BASE)))
        report["test"] = test.run(jobs)
        md.append(sweep_table(report["test"], f"Test scenes 0-{args.test_n - 1}: the chosen setting and the base"))
    report["seconds"] = round(time.time() - t0)
    (root / "sweep.json").write_text(json.dumps(report, indent=1, default=str))
    (root / "sweep.md").write_text("\n".join(md))
    if ranked:
        sweep_figure(everything, title=f"{first}: {args.n} validation scenes from {args.start}").savefig(
            root / "sweep.png", dpi=110)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
