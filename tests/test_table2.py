"""`emerdiff table2` (issue 26): the paper's Table 2 layout in one command, on a tiny folder dataset, on a
tiny ADE20K-layout folder (the paper's numbers beside ours) and from an existing evaluate run; its numbers
are the run's results.json rows; clear refusals; --help and refusals import nothing heavy."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import PALETTE, fake_segment, make_folder  # (same tests folder)

from emerdiff.cli.app import main
from emerdiff.evaluation.runner import run_evaluation
from emerdiff.evaluation.table2 import build_table2, table2_from_run


@pytest.fixture
def fake_model(monkeypatch):
    from emerdiff.evaluation import runner

    monkeypatch.setattr(runner, "_default_segmenter", lambda source, device: (fake_segment, {"fake": True}, None))


def _csv_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(r["protocol"], r["method"]): r for r in csv.DictReader(f)}


def _close(cell: str, value) -> bool:
    return (cell == "" and value is None) or (value is not None and abs(float(cell) - value) < 1e-3)


def test_table2_on_a_tiny_folder_is_the_evaluation_s_concept_rows(tmp_path, fake_model, capsys):
    data = make_folder(tmp_path / "data", n=6)
    out = tmp_path / "t2"
    assert main(["table2", str(data), "--model", "tiny", "--out", str(out), "--bootstrap", "200", "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "evaluate" / "results.json").read_text())
    rows = _csv_rows(out / "table2.csv")
    concept = {r["method"]: r for r in results["rows"] if r["protocol"] == "concept"}
    assert set(concept) == {"emerdiff", "nearest", "bilinear"}  # the fake has no image-guided readouts
    for method, r in concept.items():
        row = rows[("concept", method)]
        for key in ("miou", "miou_lo", "miou_hi", "boundary_iou", "boundary_iou_lo", "boundary_iou_hi"):
            assert _close(row[key], r[key]), (method, key)
    diff = results["intervals"]["concept"]["emerdiff-bilinear"]
    row = rows[("concept", "emerdiff")]
    assert _close(row["minus_bilinear"], diff["value"]) and _close(row["minus_bilinear_lo"], diff["lo"])
    assert diff["lo"] > 0  # the fake's "bilinear" is shifted by 3 px: EmerDiff leads, the interval says so
    # the oracle rows, scored by the same run
    majority = {r["method"]: r for r in results["rows"] if r["protocol"] == "majority"}
    assert set(majority) == set(concept)
    assert _close(rows[("majority", "bilinear")]["miou"], majority["bilinear"]["miou"])
    # the table: the paper's rows first, the test set named, no paper column for a folder dataset
    md = (out / "table2.md").read_text()
    assert md == printed
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| SD features, bilinear upsampling") and lines[2].startswith("| EmerDiff |")
    assert "folder dataset data" in md and "6 images" in md and "no paper numbers" in md and "paper (" not in md
    assert "interval excludes 0: EmerDiff leads" in md
    assert "Not in this run's records" in md and "guided_filter, joint_bilateral" in md
    # every number has its interval (or says why not): 10 columns after the row label in every row
    assert all(len(line.strip("|").split("|")) == 10 for line in lines)


def test_table2_from_an_existing_run_adds_the_oracle_from_its_records(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=6)
    run = tmp_path / "run"
    payload = run_evaluation(data, fake_segment, None, run, protocols="all", n_boot=150, bootstrap_seed=3)
    assert "majority" not in {r["protocol"] for r in payload["rows"]}
    assert main(["table2", "--from-run", str(run), "--out", str(tmp_path / "t")]) == 0
    rows = _csv_rows(tmp_path / "t" / "table2.csv")
    for r in payload["rows"]:
        if r["protocol"] == "concept":
            assert _close(rows[("concept", r["method"])]["miou"], r["miou"])
            assert _close(rows[("concept", r["method"])]["miou_lo"], r["miou_lo"])
    # the oracle from the cached records equals what evaluate --protocol majority gives on the same resamples
    oracle = run_evaluation(data, fake_segment, None, run, protocols="majority", n_boot=150, bootstrap_seed=3)
    for r in oracle["rows"]:
        row = rows[("majority", r["method"])]
        for key in ("miou", "miou_lo", "miou_hi", "boundary_iou", "boundary_iou_lo"):
            assert _close(row[key], r[key]), (r["method"], key)
    assert json.loads((tmp_path / "t" / "table2.json").read_text())["run"] == str(run)


def _ade_folder(root: Path, n: int = 4, size: int = 64) -> Path:
    """A tiny folder in the ADE20K layout (ADEChallengeData2016): raw labels 1..4, 0 = other (void)."""
    rng = np.random.RandomState(1)
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    for i in range(n):
        low = rng.randint(0, 4, size=(4, 4))
        label = np.kron(low, np.ones((size // 4, size // 4), dtype=np.uint8)).astype(np.uint8)
        img = np.clip(PALETTE[label] + rng.randn(size, size, 3) * 4, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / "validation" / f"ADE_val_{i:08d}.png")
        Image.fromarray((label + 1).astype(np.uint8)).save(root / "annotations" / "validation" / f"ADE_val_{i:08d}.png")
    return root


def test_table2_on_the_ade20k_layout_sets_the_paper_s_numbers_beside_ours(tmp_path, fake_model, capsys):
    data = _ade_folder(tmp_path / "ADEChallengeData2016")
    out = tmp_path / "t2"
    assert main(["table2", str(data), "--layout", "ade20k", "--model", "tiny", "--out", str(out),
                 "--bootstrap", "100", "--quiet"]) == 0
    md = (out / "table2.md").read_text()
    assert "ADE20K-150: ADEChallengeData2016 validation split" in md and "4 images scored" in md
    assert "2000 images: a subset" in md  # 4 of the paper's 2000: said, not hidden
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.rstrip().endswith("paper (ADE20K-150) |")
    rows = _csv_rows(out / "table2.csv")
    assert float(rows[("concept", "bilinear")]["paper_miou"]) == 29.1
    assert float(rows[("concept", "emerdiff")]["paper_miou"]) == 33.1
    assert rows[("concept", "nearest")]["paper_miou"] == "" and rows[("majority", "emerdiff")]["paper_miou"] == ""
    assert "The paper: +4.0" in md


def test_build_table2_names_cocostuff171_and_flips_a_stored_difference():
    ci = lambda v, lo, hi: {"value": v, "lo": lo, "hi": hi}  # noqa: E731
    payload = {"rows": [{"protocol": "concept", "method": m, "miou": v, "miou_lo": v - 1, "miou_hi": v + 1}
                        for m, v in (("emerdiff", 31.0), ("bilinear", 28.0), ("guided_filter", 33.0))],
               "intervals": {"concept": {"emerdiff-bilinear": ci(3.0, 1.0, 5.0),
                                         "bilinear-guided_filter": ci(-5.0, -7.0, -2.0)}},
               "config": {"layout": "cocostuff171", "split": "val2017", "num_images": 5000, "data": "/d",
                          "model": "sd15", "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95}}}
    table = build_table2(payload)
    by = {r["method"]: r for r in table["rows"]}
    assert table["dataset"] == "COCO-Stuff-171" and "subset" not in table["test_set"]
    assert (by["guided_filter"]["minus_bilinear"], by["guided_filter"]["minus_bilinear_lo"],
            by["guided_filter"]["minus_bilinear_hi"]) == (5.0, 2.0, 7.0)
    assert by["bilinear"]["paper_miou"] == 27.6 and by["emerdiff"]["paper_miou"] == 30.5
    assert table["paper_headline"] == pytest.approx(2.9)


@pytest.mark.parametrize("argv, needle", [
    (["table2", "--out", "o"], "give DATA"),
    (["table2", "--from-run", "nowhere", "--out", "o"], "no such folder"),
    (["table2", "d", "--from-run", "r", "--out", "o"], "would be ignored"),
    (["table2", "--from-run", "r", "--out", "o", "--num-clusters", "5"], "--num-clusters"),
    (["table2", "d", "--out", "o", "--bootstrap", "10"], "at least 100"),
    (["table2", "nowhere", "--out", "o"], "does not exist"),
])
def test_table2_refusals_say_what_and_how(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "d").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_table2_refuses_a_run_without_the_concept_protocol(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=3)
    run = tmp_path / "run"
    run_evaluation(data, fake_segment, None, run, protocols="per_image_hungarian", n_boot=0)
    with pytest.raises(ValueError, match="--protocol concept"):
        table2_from_run(run, tmp_path / "t")
    assert not (tmp_path / "t" / "table2.md").exists()


PROBE = """
import contextlib, io, json, sys
from emerdiff.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as e:
        code = e.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & {"torch", "diffusers", "transformers", "scipy", "sklearn"})
print(json.dumps(dict(code=code, heavy=heavy, out=out.getvalue())))
"""


@pytest.mark.parametrize("argv", [["table2", "--help"], ["table2", "--out", "o"]])
def test_table2_help_and_refusal_load_no_heavy_module(argv, tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    if argv[-1] == "--help":
        assert result["code"] == 0 and "Table 2" in result["out"] and "--from-run" in result["out"]
        assert "33.1" in result["out"] and "cocostuff171" in result["out"]
    else:
        assert result["code"] == 2


def test_table2_with_the_tiny_model_has_every_row(tmp_path, capsys):
    """The real (tiny, random) model through `emerdiff table2`: the five readouts of the same segments under
    the concept protocol and the oracle, each number as the run's results.json has it."""
    import torch

    torch.set_num_threads(1)
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "t2"
    assert main(["table2", str(data), "--model", "tiny", "--resolution", "64", "--num-clusters", "3", "--device",
                 "cpu", "--out", str(out), "--bootstrap", "100", "--quiet"]) == 0
    rows = _csv_rows(out / "table2.csv")
    methods = ("bilinear", "emerdiff", "nearest", "guided_filter", "joint_bilateral")
    assert [k for k in rows if k[0] == "concept"] == [("concept", m) for m in methods]
    assert [k for k in rows if k[0] == "majority"] == [("majority", m) for m in methods]
    results = json.loads((out / "evaluate" / "results.json").read_text())
    for r in results["rows"]:
        assert _close(rows[(r["protocol"], r["method"])]["miou"], r["miou"]), (r["protocol"], r["method"])
    md = (out / "table2.md").read_text()
    assert "| guided filter upsampling | ours |" in md and "Not in this run's records" not in md
