"""`segment --vocab` warns about names the model cannot know and about guessed classes (issue 29)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from emerdiff.assets.scenes import CAPTION_WORDS, CLASSES


def _scene(tmp_path):
    from emerdiff.evaluation.datasets import load_probe_images

    (item,) = load_probe_images(["scene:100"])  # a validation scene: never a test scene
    path = tmp_path / "scene_100.png"
    Image.fromarray(np.asarray(item.image)).save(path)
    return path


def test_reference_model_warns_about_words_outside_its_classes(tmp_path, capsys):
    from emerdiff.cli.app import main

    image = _scene(tmp_path)
    out = tmp_path / "out"
    code = main(["segment", str(image), "--model", "reference", "--vocab", "person,helmet,sky", "--out", str(out),
                 "--threads", "1", "--num-inference-steps", "10", "--modulation-timestep", "101", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    sidecar = json.loads((out / "scene_100_classes.json").read_text())
    unknown = [w for w in sidecar["warnings"] if "lie outside" in w]
    assert len(unknown) == 1, sidecar["warnings"]
    # person and helmet named, sky (one of the model's 12 classes) not
    named = unknown[0].split("lie outside")[0]
    assert "person" in named and "helmet" in named and "sky" not in named
    assert f"{len({w.lower() for w in CAPTION_WORDS})} words" in unknown[0]
    assert all(c in CAPTION_WORDS for c in CLASSES)
    # printed to stderr as well, once, with the image it concerns
    printed = [line for line in err.splitlines() if line.startswith("warning: scene_100:")]
    assert any("lie outside" in line and "person" in line for line in printed), err
    assert len(printed) == len(sidecar["warnings"])


def test_known_words_give_no_vocabulary_warning(tmp_path, capsys):
    from emerdiff.cli.app import main

    image = _scene(tmp_path)
    out = tmp_path / "out"
    code = main(["segment", str(image), "--model", "reference", "--vocab", "sky,grass,house", "--out", str(out),
                 "--threads", "1", "--num-inference-steps", "10", "--modulation-timestep", "101", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    sidecar = json.loads((out / "scene_100_classes.json").read_text())
    assert isinstance(sidecar["warnings"], list)
    assert not any("lie outside" in w for w in sidecar["warnings"])
    assert "lie outside" not in err
