"""`emerdiff compare` with boundary metrics (issue 26): when both runs scored them, the paired A - B of
Boundary IoU and boundary F of each protocol x method, from the runs' stored label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluate import _args, _rows, _worse_segment, fake_segment, make_folder  # (same tests folder)

from emerdiff.cli.app import main
from emerdiff.cli.evaluate import run
from emerdiff.evaluation.compare import compare_runs


def test_compare_reports_paired_boundary_differences(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=6)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(_args(data, a), segment_fn=fake_segment) == 0
    assert run(_args(data, b), segment_fn=_worse_segment) == 0  # EmerDiff's map shifted 6 px: worse edges
    report = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--bootstrap", "200", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    block = text.split("boundary metrics (Boundary IoU and boundary F")[1].splitlines()
    line = next(x for x in block if x.startswith("concept ") and " emerdiff " in x)
    assert line.rstrip().endswith("*")  # A's edges better, with an interval above 0
    result = json.loads(report.read_text())
    assert result["boundary"]["trimap_widths_px"] == [1, 2, 4, 8, 16]
    rows = {(r["protocol"], r["method"]): r for r in result["rows"]}
    for p in ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean"):
        for name in ("boundary_iou", "boundary_f"):
            diff = rows[(p, "emerdiff")]["boundary"][name]["a-b"]
            assert diff["lo"] > 0 and diff["lo"] <= diff["value"] <= diff["hi"], (p, name)
        same = rows[(p, "bilinear")]["boundary"]["boundary_iou"]["a-b"]  # both runs' bilinear maps agree
        assert same["value"] == 0.0 and same["lo"] is None
    # on all of each run's images the values are each run's own results.json values
    for side, folder in (("a", a), ("b", b)):
        own = {(r["protocol"], r["method"]): r for r in _rows(folder)}
        for key, row in rows.items():
            for name in ("boundary_iou", "boundary_f"):
                assert row["boundary"][name][side]["value"] == pytest.approx(own[key][name]), (side, key, name)


def test_compare_without_boundary_metrics_in_one_run_prints_only_the_miou(tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    a, b = tmp_path / "a", tmp_path / "b"
    run(_args(data, a), segment_fn=fake_segment)
    run(_args(data, b), segment_fn=_worse_segment)
    path = b / "results.json"
    payload = json.loads(path.read_text())
    del payload["config"]["boundary"]  # a run of a version before the boundary metrics
    path.write_text(json.dumps(payload))
    result = compare_runs(a, b, n_boot=50)
    assert result["boundary"] is None and all("boundary" not in r for r in result["rows"])
    with_both = compare_runs(a, a, n_boot=50)
    same = [r["a"]["value"] for r in result["rows"]]
    assert np.allclose(same, [r["a"]["value"] for r in with_both["rows"]])  # the mIoU is unchanged by the maps
