"""`emerdiff` CLI: help, layers, segment (atomic outputs, bad images skipped, exit codes)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from emerdiff.cli import main

FAST = ["--resolution", "128", "--k", "3", "--steps", "10", "--modulation-timestep", "201", "--quiet"]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("segment", "layers", "evaluate"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "--modulation-timestep" in capsys.readouterr().out


def test_layers(tiny_dir, capsys):
    assert main(["layers", str(tiny_dir), "--resolution", "512"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("up_blocks.1.attentions.0.transformer_blocks.0.attn2"))
    assert "cross" in line and "16x16" in line


def test_layers_missing_model(tmp_path, capsys):
    assert main(["layers", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_segment_writes_outputs_and_skips_bad(tiny_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 140, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    code = main(["segment", str(bad), str(good), "--model", str(tiny_dir), "--out", str(out), *FAST])
    assert code == 1  # one image failed
    err = capsys.readouterr().err
    assert "skipped" in err and "bad.png" in err
    labels = Image.open(out / "good_labels.png")
    assert labels.mode == "P" and labels.size == (140, 96)
    assert Image.open(out / "good_overlay.png").size == (140, 96)
    data = np.load(out / "good.npz")
    assert data["labels"].shape == (96, 140)
    assert np.array_equal(np.asarray(labels), data["labels"])
    assert not list(out.glob("bad*")) and not list(out.glob(".*"))  # nothing half-written


def test_segment_bad_config(tiny_dir, tmp_path, capsys):
    code = main(["segment", "x.png", "--model", str(tiny_dir), "--out", str(tmp_path), *FAST[:-1], "--k", "99"])
    assert code == 2 and "tokens" in capsys.readouterr().err


@pytest.mark.parametrize("labeller", ["unet", "clip"])
def test_segment_with_vocabulary(tiny_dir, tmp_path, labeller):
    import json

    from emerdiff.openvocab import build_tiny_clip

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(img)
    extra = ["--clip-model", str(build_tiny_clip(tmp_path / "clip"))] if labeller == "clip" else []
    code = main(["segment", str(img), "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST,
                 "--vocab", "cat, dog,grass", "--labeller", labeller, *extra])
    assert code == 0
    classes = Image.open(tmp_path / "o" / "img_classes.png")
    assert classes.size == (90, 90) and np.asarray(classes).max() <= 2
    info = json.loads((tmp_path / "o" / "img_classes.json").read_text())
    assert info["vocabulary"] == ["cat", "dog", "grass"]
    assert Image.open(tmp_path / "o" / "img_legend.png").size[0] > 100


def test_segment_duplicate_vocabulary(tiny_dir, tmp_path, capsys):
    code = main(["segment", "x.png", "--model", str(tiny_dir), "--out", str(tmp_path), *FAST, "--vocab", "a,b,a",
                 "--labeller", "unet"])
    assert code == 2 and "duplicate" in capsys.readouterr().err


def test_figures_runs_a_notebook(tmp_path):
    out = tmp_path / "figs"
    code = main(["figures", "--model", "tiny", "--only", "00", "--out", str(out), "--executed", str(tmp_path / "exec"),
                 "-p", "images", '["astronaut"]', "-p", "torch_threads", "1"])
    assert code == 0
    assert (out / "00_quickstart_segmentation.png").exists() and (out / "00_quickstart.json").exists()


def test_figures_no_notebooks(tmp_path, capsys):
    assert main(["figures", "--notebooks", str(tmp_path)]) == 2
    assert "no study notebooks" in capsys.readouterr().err


def test_figure_sizes_follow_the_model_folder(tmp_path):
    import json as _json

    from emerdiff.cli import FIGURE_SIZES, figure_sizes
    from emerdiff.reference import WEIGHTS

    assert figure_sizes("tiny") == FIGURE_SIZES["tiny"]
    # a copy of the reference model in any folder is a 128 px model, not a 512 px one
    assert figure_sizes(str(WEIGHTS)) == FIGURE_SIZES["reference"]
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    (sd / "vae").mkdir()
    (sd / "unet" / "config.json").write_text(_json.dumps({"sample_size": 64}))
    (sd / "vae" / "config.json").write_text(_json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert figure_sizes(str(sd)) == FIGURE_SIZES["default"]
    assert figure_sizes("runwayml/stable-diffusion-v1-5") == FIGURE_SIZES["default"]
    assert figure_sizes(str(tmp_path / "missing")) == FIGURE_SIZES["default"]
