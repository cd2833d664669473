"""make figures' run profiles (issue 25, emerdiff/notebook/profiles.py): every notebook has an expected time
for the reference model on the CPU in both profiles, a profile sets only parameters its notebook has, the
table printed before a run lists every notebook and adds them up, and the Makefile wires it in."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emerdiff.notebook import profiles

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def parameter_names(source: Path) -> set[str]:
    """Names assigned in the notebook's cell tagged parameters."""
    text = source.read_text()
    cell = text.split('# %% tags=["parameters"]', 1)[1].split("\n# %%", 1)[0]
    return {t.id for node in ast.parse(cell).body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


def test_every_notebook_has_an_estimate_in_every_profile():
    stems = [p.stem for p in NOTEBOOKS]
    assert tuple(stems) == profiles.NOTEBOOK_STEMS
    for profile in profiles.PROFILES:
        table = profiles.ESTIMATES[("reference", "cpu")][profile]
        assert sorted(table) == stems, profile
        assert all(seconds > 0 for seconds, _ in table.values())
    quick = sum(s for s, _ in profiles.ESTIMATES[("reference", "cpu")]["quick"].values())
    full = sum(s for s, _ in profiles.ESTIMATES[("reference", "cpu")]["full"].values())
    assert quick <= 15 * 60 < full  # the quick default fits the 15 minutes; the full sweep does not


def test_profiles_set_only_parameters_the_notebooks_have():
    assert profiles.DEFAULT_PROFILE == "quick" and profiles.PROFILES["full"] == {}
    by_stem = {p.stem: parameter_names(p) for p in NOTEBOOKS}
    for profile, notebooks in profiles.PROFILES.items():
        for stem, params in notebooks.items():
            assert stem in by_stem, (profile, stem)
            assert set(params) <= by_stem[stem], (profile, stem, set(params) - by_stem[stem])
    assert profiles.profile_params("quick", "notebooks/02_timestep_probe.ipynb")["modulation_timesteps"] == 6
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        profiles.profile_params("fast", "00_quickstart")


def test_plan_table_lists_every_notebook_and_the_total():
    names = [str(p.with_suffix(".ipynb")) for p in NOTEBOOKS]
    text = profiles.plan_table(names, "quick", "reference", "cpu")
    table = profiles.ESTIMATES[("reference", "cpu")]["quick"]
    for stem in table:
        assert re.search(rf"^  {stem} ", text, re.M), stem
    total = sum(s for s, _ in table.values())
    assert f"{total / 60:.1f} min" in text.splitlines()[-3] and "total" in text.splitlines()[-3]
    assert "modulation_timesteps=6" in text and "PROFILE=full" in text
    # an up-to-date notebook is marked and not counted
    skipped = profiles.plan_table(names, "quick", "reference", "cuda:0", up_to_date=["02_timestep_probe"])
    assert "no estimates for reference on cuda" in skipped and "up to date" in skipped
    full = profiles.plan_table(names, "full", "reference", "cpu")
    assert "~27 min" in full or "~26.9 min" in full  # 02, extrapolated


def test_command_line_plan_and_params(tmp_path):
    names = [str(p.with_suffix(".ipynb")) for p in NOTEBOOKS]
    out = subprocess.run([sys.executable, "-m", "emerdiff.notebook.profiles", "plan", "--profile", "full", *names],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "profile full" in out.stdout and "02_timestep_probe" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "emerdiff.notebook.profiles", "plan", "--profile", "nope", names[0]],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown profile 'nope'" in bad.stderr
    f = tmp_path / "p.yaml"
    assert profiles.main(["params", "--profile", "quick", "02_timestep_probe", str(f)]) == 0
    assert json.loads(f.read_text()) == {"feature_timesteps": 10, "modulation_timesteps": 6}
    assert profiles.main(["params", "--profile", "full", "02_timestep_probe", str(f)]) == 0
    assert json.loads(f.read_text()) == {}


def test_stale_follows_makes_rule(tmp_path):
    import os

    nb, stamp, src = tmp_path / "00_x.ipynb", tmp_path / "00_x.stamp", tmp_path / "m.py"
    for i, p in enumerate((nb, src, stamp)):
        p.write_text("x")
        os.utime(p, (1000 + i, 1000 + i))
    assert not profiles.stale(nb, stamp, [src])
    os.utime(src, (2000, 2000))
    assert profiles.stale(nb, stamp, [src])
    assert profiles.stale(nb, tmp_path / "missing.stamp", [])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_passes_the_profile_and_tracks_every_package_module():
    dry = subprocess.run(["make", "-n", "-p", "figures", "PROFILE=full", "EXEC_DIR=/nonexistent/x"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "emerdiff.notebook.profiles plan --profile full" in dry
    assert "-f /nonexistent/x/02_timestep_probe.profile.yaml" in dry
    rule = next(line for line in dry.splitlines() if line.startswith("/nonexistent/x/00_quickstart.stamp:"))
    for module in ("emerdiff/config.py", "emerdiff/method/pipeline.py", "emerdiff/sd/loading.py",
                   "emerdiff/notebook/profiles.py"):
        assert module in rule.split(), module


def test_emerdiff_figures_applies_the_profile(tmp_path, monkeypatch, capsys):
    papermill = pytest.importorskip("papermill")
    import emerdiff.cli.app as cli

    (tmp_path / "nb").mkdir()
    for stem in ("00_quickstart", "02_timestep_probe"):
        (tmp_path / "nb" / f"{stem}.ipynb").write_text("{}")
    seen = {}
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, dst, parameters, **kw: seen.__setitem__(Path(src).stem, parameters))
    monkeypatch.setattr(cli, "jupyter_kernel", lambda preferred: "python3")
    common = ["figures", "--notebooks", str(tmp_path / "nb"), "--out", str(tmp_path / "f"), "--executed",
              str(tmp_path / "e")]
    assert cli.main([*common, "-p", "modulation_timesteps", "3"]) == 0  # default: quick, -p wins
    assert seen["02_timestep_probe"]["feature_timesteps"] == 10 and seen["02_timestep_probe"]["modulation_timesteps"] == 3
    assert "feature_timesteps" not in seen["00_quickstart"]
    err = capsys.readouterr().err
    assert "profile quick" in err and "02_timestep_probe" in err and "total" in err
    assert cli.main([*common, "--profile", "full"]) == 0
    assert "feature_timesteps" not in seen["02_timestep_probe"]


def test_schedule_points_spread_a_count_over_any_schedule():
    from emerdiff.studies.probes import schedule_points

    fifty = list(range(981, 0, -20))
    assert schedule_points(fifty, None) == fifty
    assert schedule_points(fifty, 6) == [981, 781, 581, 401, 201, 1]  # both ends, evenly spread
    assert schedule_points(fifty, 10)[0] == 981 and schedule_points(fifty, 10)[-1] == 1
    assert len(schedule_points(fifty, 10)) == 10 and schedule_points(list(range(901, 0, -100)), 20) == list(
        range(901, 0, -100))
    assert schedule_points(fifty, [81, 281]) == [81, 281]
    with pytest.raises(ValueError, match="not on the schedule"):
        schedule_points(fifty, [80])
    with pytest.raises(ValueError, match=">= 1"):
        schedule_points(fifty, 0)


def test_the_figures_command_offers_every_profile():
    from emerdiff.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["figures"]
    (action,) = [a for a in sub._actions if a.dest == "profile"]
    assert sorted(action.choices) == sorted(profiles.PROFILES) and action.default == profiles.DEFAULT_PROFILE
