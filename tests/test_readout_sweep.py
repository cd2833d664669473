"""The readout sweep of issue 13: selection rule, phases and one end-to-end run on the tiny model."""

from __future__ import annotations

import json

import pytest

from training.readout_sweep import (
    BASE,
    bar_summary,
    main,
    phase1_settings,
    phase2_settings,
    rank,
    setting_name,
)


def _intervals(leads: dict[str, float], lo_shift: float = -1.0) -> dict:
    out = {}
    for protocol in ("dataset_hungarian", "concept", "per_image_hungarian"):
        out[protocol] = {"emerdiff": {"value": 30.0, "lo": 28.0, "hi": 32.0}}
        for b in ("nearest", "bilinear"):
            v = leads.get(f"{protocol}-{b}", 5.0)
            out[protocol][f"emerdiff-{b}"] = {"value": v, "lo": v + lo_shift, "hi": v + 1}
    return out


def test_bar_summary_margin_is_the_smallest_counted_lead():
    s = bar_summary(_intervals({"dataset_hungarian-bilinear": 2.5, "concept-nearest": 4.0,
                                "per_image_hungarian-nearest": -9.0}))  # per-image Hungarian never counts
    assert s["margin"] == 2.5 and set(s["leads"]) == {"dataset_hungarian-nearest", "dataset_hungarian-bilinear",
                                                      "concept-nearest", "concept-bilinear"}
    assert s["met"]  # every lead >= 2 with lo = value - 1 > 0


@pytest.mark.parametrize("leads, lo_shift", [({"concept-bilinear": 1.9}, -1.0),   # one lead under 2
                                             ({}, -5.5)])                         # intervals reach below 0
def test_bar_not_met(leads, lo_shift):
    assert not bar_summary(_intervals(leads, lo_shift))["met"]


def test_bar_summary_needs_the_mask_protocols():
    with pytest.raises(KeyError, match="concept"):
        bar_summary({"dataset_hungarian": _intervals({})["dataset_hungarian"]})


def test_phase1_moves_one_knob_at_a_time():
    settings = phase1_settings(BASE, {"modulation_timestep": [61, 81, 101], "num_clusters": [6]})
    assert settings[0] == BASE and len(settings) == 4  # t_m 81 is the base: not repeated
    for s in settings[1:]:
        assert sum(s[k] != BASE[k] for k in BASE) == 1
    assert len({setting_name("m", s) for s in settings}) == 4


def test_phase2_is_the_factorial_of_each_knobs_two_best_values():
    def rec(margin, **moved):
        return {"knobs": {**BASE, **moved}, "summary": {"margin": margin}}

    results = [rec(1.0), rec(3.0, modulation_timestep=101), rec(0.5, modulation_timestep=61),
               rec(2.0, num_clusters=6), rec(-1.0, blur_sigma=2.0), rec(1.5, blur_sigma=0.5),
               {"knobs": {**BASE, "num_clusters": 12}}]  # not completed: ignored
    assert [r["summary"]["margin"] for r in rank(results)] == [3.0, 2.0, 1.5, 1.0, 0.5, -1.0]
    combos = phase2_settings(results)
    assert {(c["modulation_timestep"], c["num_clusters"]) for c in combos} == {(101, 6), (101, 8), (81, 6), (81, 8)}
    assert all(c["blur_sigma"] == 0.5 for c in combos)  # non-factorial knob: its best value only
    assert all(c["modulation_strength"] == BASE["modulation_strength"] for c in combos)


def test_sweep_refuses_validation_scenes_that_overlap_the_test_scenes(tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", "m=tiny", "--out", str(tmp_path), "--start", "50"])
    with pytest.raises(SystemExit):
        main(["--model", "m=tiny", "--out", str(tmp_path), "--grid", "lambda=[1]"])


def test_sweep_end_to_end_on_the_tiny_model(tmp_path, tiny_dir):
    out = tmp_path / "sweep"
    code = main(["--model", f"a={tiny_dir}", "--model", f"b={tiny_dir}", "--out", str(out), "--n", "1",
                 "--test-n", "1", "--grid", "modulation_strength=[5.0]", "--transfer", "1", "--device", "cpu",
                 "--bootstrap", "100", "--workers", "0"])  # in-process: no interpreter start-ups
    assert code == 0
    report = json.loads((out / "sweep.json").read_text())
    names = {r["name"] for r in report["validation"]}
    # phase 1: base + lambda 5; phase 2: the same two (already run); phase 3: the best on model b
    assert len(names) == 3 and sum(n.startswith("b_") for n in names) == 1
    assert all(r.get("summary") for r in report["validation"])
    best = rank(report["validation"])[0]
    assert report["chosen"] == best["name"]
    assert best["summary"]["margin"] == min(v["value"] for v in best["summary"]["leads"].values())
    assert report["test"][0]["name"] == best["name"] and report["test"][0].get("summary")
    test_settings = json.loads((out / "test" / best["name"] / "results.json").read_text())["settings"]
    assert test_settings["first_scene"] == 0 and test_settings["scenes"] == 1
    assert "| 1 |" in (out / "sweep.md").read_text() and (out / "sweep.png").stat().st_size > 0


def test_sweep_figure_has_a_panel_per_knob_with_the_runs_that_moved_it():
    import matplotlib

    matplotlib.use("Agg")
    from training.readout_sweep import sweep_figure

    def rec(lead, **moved):
        return {"model": "m", "knobs": {**BASE, **moved}, "summary": bar_summary(_intervals({}, -1.0) | {
            "concept": {f"emerdiff-{b}": {"value": lead, "lo": lead - 1, "hi": lead + 2} for b in ("nearest", "bilinear")}})}

    runs = [rec(1.0), rec(3.0, modulation_timestep=101), rec(-2.0, modulation_timestep=41), rec(0.5, num_clusters=6),
            {"model": "m", "knobs": BASE}]  # not completed: left out
    fig = sweep_figure(runs)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == set(BASE)
    tm = panels["modulation_timestep"]
    assert [t.get_text() for t in tm.get_xticklabels()] == ["41", "[81]", "101"]  # sorted, base bracketed
    concept = [line for line in tm.get_lines() if list(line.get_ydata()) == [-2.0, 1.0, 3.0]]
    assert len(concept) == 2  # concept - nearest and concept - bilinear at the three t_m
    assert [t.get_text() for t in panels["num_clusters"].get_xticklabels()] == ["6", "[8]"]


def test_sweep_subprocess_runs_resume_and_stop_at_the_deadline(tmp_path, tiny_dir):
    """--workers N runs each setting in its own worker process (a function call, no argv); a finished run's folder is reused, and a run that
    cannot start before the deadline is reported, not half-written."""
    out = tmp_path / "sweep"
    argv = ["--model", f"a={tiny_dir}", "--out", str(out), "--n", "1", "--test-n", "0", "--grid",
            "num_clusters=[]", "--device", "cpu", "--bootstrap", "100", "--workers", "1"]
    assert main(argv) == 0
    first = json.loads((out / "sweep.json").read_text())["validation"]
    assert len(first) == 1 and first[0].get("summary") and first[0]["returncode"] == 0
    assert main([*argv, "--budget", "1", "--test-reserve", "0"]) == 0  # no time left: the finished run is reused
    again = json.loads((out / "sweep.json").read_text())["validation"]
    assert again[0]["summary"] == first[0]["summary"] and "seconds" not in again[0]
    assert main([*argv[:3], str(tmp_path / "late"), *argv[4:], "--budget", "1", "--test-reserve", "0"]) == 0
    late = json.loads((tmp_path / "late" / "sweep.json").read_text())
    assert late["validation"][0]["skipped"] == "no time left" and late["chosen"] is None
    assert not (tmp_path / "late" / "validation").exists() or not any((tmp_path / "late" / "validation").iterdir())
