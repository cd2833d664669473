"""The benchmark scripts run end to end on the tiny model; speed is measured, never asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_ARGS = ["--resolution", "128", "--k", "3", "--steps", "10", "--t-m", "201", "--kmeans-n-init", "1"]


def test_bench_segment_table_and_json(tiny_dir, tmp_path, capsys):
    import bench_segment

    out = tmp_path / "bench.json"
    md = tmp_path / "RESULTS.md"
    result = bench_segment.main(["--model", str(tiny_dir), *TINY_ARGS, "--max-batch", "4,7",
                                 "--no-warmup", "--json", str(out), "--markdown", str(md)])
    text = capsys.readouterr().out
    for col in ("inversion", "features", "modulation", "decode", "assign", "total", "x total",
                "calls", "samples", "decoded", "RSS MB", "agree"):
        assert col in text
    assert "batched" in text and "per-mask loop" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["batched", "batched", "per-mask loop (full prep)"]
    assert all(r["x total"] > 0 for r in rows)  # a ratio is printed; its value is not asserted
    k = rows[0]["masks"]
    # call counts follow from the layout: 3 steps after t_m (201, 101, 1), chunks of max_batch - 1 pairs
    assert rows[0]["calls_by_stage"]["modulation"] == -(-2 * k // 3) * 3
    assert rows[2]["calls_by_stage"]["modulation"] == k * 3
    assert rows[2]["calls_by_stage"]["inversion"] == 10  # full-schedule inversion in the loop
    assert all(r["decoded"] == 2 * k for r in rows)
    # batching and chunking do not change the answer (fp32, CPU)
    assert all(r["agree"] >= 0.999 for r in rows)
    assert "| model |" in md.read_text()
    assert result["machine"]["cores"] >= 1


@pytest.mark.parametrize("radius", [None, 0])
def test_batched_runner_matches_segment(tiny_model, photo, radius):
    """The benchmark's labels are segment's, the assignment radius included (radius 0: nearest upsampling)."""
    from _common import config_for, run_batched

    from emerdiff import EmerDiffConfig
    from emerdiff.method.pipeline import EmerDiff

    cfg = config_for(tiny_model, EmerDiffConfig(resolution=128, num_clusters=3, num_inference_steps=10,
                                                modulation_timestep=201, kmeans_n_init=1, max_batch=5,
                                                assign_radius=radius))
    pipe = EmerDiff(tiny_model, cfg)
    run = run_batched(pipe, photo)
    seg = pipe.segment(photo, progress=False)
    np.testing.assert_array_equal(run.labels, seg.labels)
    assert run.unet_calls == seg.unet_calls
    if radius == 0:
        np.testing.assert_array_equal(run.labels, seg.nearest_labels)


def test_readout_study_calls(tiny_dir, capsys):
    import readout_study

    rows = readout_study.main(["--model", str(tiny_dir), "--resolution", "128", "--k", "3", "--steps", "10",
                               "--t-m", "201", "--readout-steps", "1,2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "x fewer" in out and "saved" in out
    assert [r["readout"] for r in rows] == ["full", 1, 2]
    assert rows[0]["agree"] == 1.0 and 0 <= rows[1]["miou"] <= 100
    full = rows[0]
    assert full["unet_calls"]["inversion"] == full["inversion"] > 0 and full["saved"] == 0
    for r in rows[1:]:
        # the core skips the inversion in readout mode: 1 feature call + readout_steps x chunks
        assert "inversion" not in r["unet_calls"] and r["inversion"] == 0
        assert r["unet_calls"]["features"] == 1
        assert r["calls"] == 1 + r["unet_calls"]["modulation"] < full["calls"]
        assert r["saved"] == full["calls"] - r["calls"] > 0 and r["x fewer"] > 1
        assert r["same_seg"] == 1.0  # same sampled x_tf -> same features and k-means segments
    assert rows[2]["unet_calls"]["modulation"] == 2 * rows[1]["unet_calls"]["modulation"]


def test_batched_readout_rows_run_no_inversion(tiny_model, photo):
    from _common import config_for, pixel_agreement, run_batched, run_per_mask_loop

    from emerdiff import EmerDiffConfig
    from emerdiff.method.pipeline import EmerDiff

    base = EmerDiffConfig(resolution=128, num_clusters=3, num_inference_steps=10, modulation_timestep=201,
                          kmeans_n_init=1, max_batch=7)
    full = run_batched(EmerDiff(tiny_model, config_for(tiny_model, base)), photo)
    pipe = EmerDiff(tiny_model, config_for(tiny_model, base, readout_steps=1))
    run = run_batched(pipe, photo)
    assert "inversion" not in run.unet_calls and run.timings["inversion"] == 0
    assert run.unet_calls["features"] == 1 and run.total_calls < full.total_calls
    # the textbook loop still inverts the whole schedule, also in readout mode
    loop = run_per_mask_loop(pipe, photo, prepare="full")
    assert loop.unet_calls["inversion"] == 10
    assert pixel_agreement(loop.labels, run.labels) >= 0.999  # same x_tm, other chunking


def test_readout_study_scenes_have_ground_truth(tiny_dir, capsys):
    import readout_study

    rows = readout_study.main(["--model", str(tiny_dir), "--scenes", "1", "--k", "3", "--steps", "10",
                               "--t-m", "201", "--readout-steps", "1", "--threads", "1", "--blur", "1"])
    assert "scene" not in capsys.readouterr().err
    assert [r["readout"] for r in rows] == ["full", 1]
    assert all(0 <= r["miou"] <= 100 for r in rows)  # held-out scenes carry their label maps


def test_readout_study_refuses_mixed_ground_truth(tiny_dir, tmp_path):
    import readout_study
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (96, 96), (10, 200, 30)).save(path)
    with pytest.raises(SystemExit):
        readout_study.main(["--model", str(tiny_dir), "--images", str(path), "--scenes", "1"])


def test_train_speed_table(capsys, monkeypatch):
    """Every variant of the training-speed table runs (tiny preset) and gets a ratio to the baseline."""
    import train_speed

    monkeypatch.setattr(train_speed.torch, "get_num_threads", lambda: 1)  # keep the suite on one thread
    assert train_speed.main(["--preset", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 6 and rows[0].endswith("| 1.00x |")
    assert all(float(r.split("|")[2]) > 0 for r in rows)
