"""Held-out scene evaluation (issue: reference model) on the tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emerdiff.assets.scenes import CLASSES, heldout_scene_seeds, make_scene
from emerdiff.evaluation.datasets import open_dataset
from training.heldout import learning_curve_probe, main, model_world, write_heldout_folder


def test_heldout_folder_matches_generator(tmp_path):
    root = write_heldout_folder(tmp_path / "d", n=3)
    ds = open_dataset("folder", root)
    assert len(ds) == 3 and list(ds.class_names) == list(CLASSES)
    scene = make_scene(heldout_scene_seeds(3)[1], 128)
    sample = ds[1]
    assert np.array_equal(np.asarray(sample.label), scene.labels)
    assert np.array_equal(np.asarray(Image.open(root / "images" / "scene_00001.png")), scene.image)


def test_heldout_main_end_to_end(tmp_path, tiny_dir):
    out = tmp_path / "eval"
    code = main(["--model", str(tiny_dir), "--n", "2", "--out", str(out), "--num-clusters", "3", "--device", "cpu",
                 "--set", "num_inference_steps=10", "--set", "modulation_timestep=201", "--bootstrap", "100"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    methods = {(r["protocol"], r["method"]) for r in rows}
    for protocol in ("dataset_hungarian", "concept", "concept_token_mean", "per_image_hungarian"):
        for method in ("emerdiff", "nearest", "bilinear"):
            assert (protocol, method) in methods
    assert ("openvocab", "unet+emerdiff") in methods
    table = (out / "results.md").read_text()
    assert "| dataset_hungarian | emerdiff |" in table and "settings:" in table
    intervals = json.loads((out / "results.json").read_text())["intervals"]
    for protocol in ("dataset_hungarian", "concept", "concept_token_mean", "per_image_hungarian"):
        for name in ("emerdiff", "nearest", "emerdiff-nearest", "emerdiff-bilinear"):
            v = intervals[protocol][name]
            assert v["lo"] <= v["hi"] and np.isfinite(v["value"]), (protocol, name)
    assert "| dataset_hungarian | emerdiff - nearest |" in table
    boundary = json.loads((out / "results.json").read_text())["boundary_intervals"]
    assert np.isfinite(boundary["majority"]["boundary_iou"]["emerdiff"]["value"])  # the oracle's labelling too
    assert "| majority | emerdiff - nearest | " in table.split("Boundary metrics")[1]


def test_heldout_folder_of_validation_scenes_never_holds_test_scenes(tmp_path):
    """--start 100 (validation, for choosing a model or readout) renders other scenes than the test set."""
    from training.heldout import VALIDATION_START

    test = write_heldout_folder(tmp_path / "t", n=2)
    val = write_heldout_folder(tmp_path / "v", n=2, start=VALIDATION_START)
    names = lambda root: sorted(x.name for x in (root / "images").iterdir())  # noqa: E731
    assert names(test) == ["scene_00000.png", "scene_00001.png"]
    assert names(val) == [f"scene_{VALIDATION_START:05d}.png", f"scene_{VALIDATION_START + 1:05d}.png"]
    scene = make_scene(heldout_scene_seeds(1, start=VALIDATION_START)[0], 128)
    assert np.array_equal(np.asarray(Image.open(val / "images" / names(val)[0])), scene.image)


def test_heldout_folder_of_the_flat_world_and_world_mismatch(tmp_path):
    root = write_heldout_folder(tmp_path / "d", n=2, world="flat")
    scene = make_scene(heldout_scene_seeds(2)[1], 128, world="flat")
    assert np.array_equal(np.asarray(Image.open(root / "images" / "scene_00001.png")), scene.image)
    with pytest.raises(ValueError, match="flat"):  # a folder of one world is never topped up with another
        write_heldout_folder(tmp_path / "d", n=3, world="textured")


def test_model_world_defaults_to_textured_for_folders_without_a_record(tiny_dir):
    assert model_world(tiny_dir) == "textured"
    assert model_world("reference") in ("textured", "flat")


def test_learning_curve_probe_reports_every_curve(tiny_dir):
    out = learning_curve_probe(tiny_dir, 0, n=1, config=dict(num_inference_steps=10, modulation_timestep=201,
                                                             num_clusters=3, max_batch=7),
                               readouts={"t_m=101": {"modulation_timestep": 101}})
    for key in ("locality_modulated_call", "locality_denoised_latent", "locality_decoded", "locality_chance",
                "acc_emerdiff", "acc_nearest", "acc_bilinear", "acc_emerdiff_t_m=101"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["locality_chance"] == pytest.approx(1 / 3, abs=0.2) and out["world"] == "textured"


def test_heldout_table_adds_boundary_metrics_after_the_existing_lines():
    """results_table with boundary intervals keeps every line it wrote without them, in order, and adds
    the boundary table (every protocol x method, EmerDiff's differences) before the settings line."""
    from training.heldout import results_table

    rows = [{"protocol": "concept", "method": m, "miou": v, "pixel_accuracy": 50.0, "locality": None}
            for m, v in (("emerdiff", 40.0), ("nearest", 35.0))]
    ci = {"value": 1.0, "lo": 0.5, "hi": 2.0}
    intervals = {"concept": {"emerdiff": ci, "nearest": ci, "emerdiff-nearest": ci}}
    metric = {"emerdiff": {"value": 30.0, "lo": 20.0, "hi": 40.0}, "nearest": {"value": 25.0, "lo": 15.0, "hi": 35.0},
              "emerdiff-nearest": {"value": 5.0, "lo": -1.0, "hi": 9.0}}
    boundary = {"concept": {"boundary_iou": metric, "boundary_f": metric, "trimap_iou_1": metric,
                            "trimap_iou_4": metric}}
    plain = results_table(rows, {"k": 8}, intervals).splitlines()
    table = results_table(rows, {"k": 8}, intervals, boundary, {"band_px": 4, "tolerance_px": 2}).splitlines()
    assert table[:len(plain) - 2] == plain[:-2] and table[-2:] == plain[-2:]  # ... then blank + settings
    added = table[len(plain) - 2:-2]
    assert "| concept | emerdiff | 30.0 | [20.0, 40.0] | 30.0 | [20.0, 40.0] | 30.0 / 30.0 |" in added
    assert any("d = 4 px" in line and "2 px" in line for line in added)
    assert "| concept | emerdiff - nearest | +5.0 | [-1.0, +9.0] | +5.0 | [-1.0, +9.0] |" in added
