"""Held-out scene evaluation (issue: reference model) on the tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from emerdiff.datasets import open_dataset
from emerdiff.reference.heldout import main, write_heldout_folder
from emerdiff.reference.scenes import CLASSES, heldout_scene_seeds, make_scene


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
    code = main(["--model", str(tiny_dir), "--n", "2", "--out", str(out), "--k", "3", "--device", "cpu",
                 "--set", "num_inference_steps=10", "--set", "modulation_timestep=201"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    methods = {(r["protocol"], r["method"]) for r in rows}
    for protocol in ("hungarian", "concept"):
        for method in ("emerdiff", "nearest", "bilinear"):
            assert (protocol, method) in methods
    assert ("openvocab", "unet+emerdiff") in methods
    table = (out / "results.md").read_text()
    assert "| hungarian | emerdiff |" in table and "settings:" in table
