"""`emerdiff` CLI: help, layers, segment (atomic outputs, bad images skipped, exit codes)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from emerdiff.cli.app import main

FAST = ["--resolution", "128", "--num-clusters", "3", "--num-inference-steps", "10", "--modulation-timestep", "201",
        "--quiet"]


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
    code = main(["segment", "x.png", "--model", str(tiny_dir), "--out", str(tmp_path), *FAST[:-1], "--num-clusters", "99"])
    assert code == 2 and "tokens" in capsys.readouterr().err


@pytest.mark.parametrize("labeller", ["unet", "clip"])
def test_segment_with_vocabulary(tiny_dir, tmp_path, labeller):
    import json

    from builders import build_tiny_clip

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


def test_figures_runs_a_notebook(tmp_path, capfd):
    out = tmp_path / "figs"
    code = main(["figures", "--model", "tiny", "--only", "00", "--out", str(out), "--executed", str(tmp_path / "exec"),
                 "-p", "images", '["astronaut"]', "-p", "torch_threads", "1"])
    assert code == 0
    assert (out / "00_quickstart_segmentation.png").exists() and (out / "00_quickstart.json").exists()
    err = capfd.readouterr().err  # fd level: the kernel process writes there, not to sys.stderr
    assert "[1/1] running 00_quickstart.ipynb" in err
    assert "over TCP" not in err  # the kernel's per-notebook warning is silenced
    assert str(out.resolve()) in err.splitlines()[-1]  # ends naming the absolute figure folder


def test_figures_no_notebooks(tmp_path, capsys):
    assert main(["figures", "--notebooks", str(tmp_path)]) == 2
    assert "no study notebooks" in capsys.readouterr().err


def test_presets_follow_the_model_folder(tmp_path):
    import json as _json

    from emerdiff.assets import WEIGHTS
    from emerdiff.config import PRESETS, model_kind, preset

    assert preset("tiny") == PRESETS["tiny"] and model_kind("tiny") == "tiny"
    # a copy of the reference model in any folder is a 128 px model, not a 512 px one
    assert model_kind(str(WEIGHTS)) == "reference" and preset(str(WEIGHTS)) == PRESETS["reference"]
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    (sd / "vae").mkdir()
    (sd / "unet" / "config.json").write_text(_json.dumps({"sample_size": 64}))
    (sd / "vae" / "config.json").write_text(_json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert model_kind(str(sd)) == "paper" and preset(str(sd)) == PRESETS["paper"]
    # SD-shaped at 16 x 8 = 128 px native: sized like the reference model
    (sd / "unet" / "config.json").write_text(_json.dumps({"sample_size": 16}))
    assert model_kind(str(sd)) == "reference"
    assert model_kind("runwayml/stable-diffusion-v1-5") == "paper"
    assert model_kind(str(tmp_path / "missing")) == "paper"


def _subcommands():
    from emerdiff.cli.app import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


@pytest.mark.parametrize("command", ["segment", "layers", "figures", "evaluate"])
def test_every_option_has_help_with_its_default(command, capsys):
    parser = _subcommands()[command]
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:  # hidden: deprecated aliases
            continue
        assert action.help, (command, action.dest)
        if action.option_strings:  # options say their default (or that they are required)
            text = action.help.lower()
            assert "default" in text or (action.required and "required" in text), (command, action.option_strings)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "default" in capsys.readouterr().out


def test_labeller_defaults_agree():
    subs = _subcommands()
    assert subs["segment"].get_default("labeller") == subs["evaluate"].get_default("labeller") == "unet"
    assert subs["segment"].get_default("model") == subs["evaluate"].get_default("model") == "reference"


def test_figures_kernel_matches_the_makefile():
    from pathlib import Path

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    kernel = next(l.split("?=")[1].strip() for l in make.splitlines() if l.startswith("KERNEL"))
    assert _subcommands()["figures"].get_default("kernel") == kernel == "emerdiff"


def _sized(argv):
    """The EmerDiffConfig fields that segment and evaluate would use for these arguments."""
    from emerdiff.cli.app import build_parser, config_from_args

    parser = build_parser()
    seg = config_from_args(parser.parse_args(["segment", "x.png", *argv]))
    ev = config_from_args(parser.parse_args(["evaluate", "--data", "d", "--out", "o", *argv]))
    keys = ("resolution", "num_clusters", "num_inference_steps", "modulation_timestep", "blur_sigma", "max_batch")
    fields = {k: getattr(seg, k) for k in keys}
    assert fields == {k: getattr(ev, k) for k in keys}  # one rule for both commands
    return fields


def test_size_rule_per_model(tiny_dir):
    # no --model: the reference model at its native 128 px, K 8, every modulated run in one batch,
    # t_m 81 (its readout chosen on validation scenes)
    assert _sized([]) == dict(resolution=128, num_clusters=8, num_inference_steps=50, modulation_timestep=81,
                              blur_sigma=1.0, max_batch=17)
    assert _sized(["--model", "tiny"]) == dict(resolution=128, num_clusters=4, num_inference_steps=10,
                                               modulation_timestep=201, blur_sigma=1.0, max_batch=9)
    # an SD-shaped folder written with save_pretrained (native 256 px > 128): the paper's settings
    paper = dict(resolution=512, num_clusters=25, num_inference_steps=50, modulation_timestep=281,
                 blur_sigma=4.0, max_batch=16)
    assert _sized(["--model", str(tiny_dir)]) == paper
    # flags override the rule
    assert _sized(["--model", str(tiny_dir), "--num-clusters", "5", "--resolution", "256"]) == dict(paper, num_clusters=5,
                                                                                       resolution=256)


def test_segment_says_what_it_chose(tiny_dir, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    import torch

    threads = torch.get_num_threads()
    try:
        code = main(["segment", str(img), str(img), "--model", str(tiny_dir), "--out", str(tmp_path / "o"),
                     "--resolution", "128", "--num-clusters", "3", "--num-inference-steps", "10", "--modulation-timestep", "201",
                     "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    err = capsys.readouterr().err
    assert f"settings for model {str(tiny_dir)!r}" in err
    assert "resolution=128 (given)" in err and "num_clusters=3 (given)" in err and "blur_sigma=4.0," in err
    assert "[1/2] " in err and "[2/2] " in err
    assert "modulation (" in err and "UNet calls + 7 decodes" in err  # the bar says what it counts (2K + the reference, for symmetry)


def test_quiet_silences_weight_loading(tiny_dir, tmp_path, capfd):
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    assert main(["segment", str(img), "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "settings for" not in err and "[1/1]" not in err


def test_clip_labeller_without_network_fails_at_once(tiny_dir, tmp_path, monkeypatch, capsys):
    import emerdiff.method.vocabulary as ov

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(ov, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(ov, "_in_hub_cache", lambda repo: False)
    code = main(["segment", "x.png", "--model", str(tiny_dir), "--out", str(tmp_path), *FAST,
                 "--vocab", "cat,dog", "--labeller", "clip", "--clip-model", "someone/not-cached-clip"])
    err = capsys.readouterr().err
    assert code == 2 and "unreachable" in err and "--labeller unet" in err
    # offline (HF_HUB_OFFLINE=1): the loader's own error, with the same hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["segment", "x.png", "--model", str(tiny_dir), "--out", str(tmp_path), *FAST,
                 "--vocab", "cat,dog", "--labeller", "clip", "--clip-model", "someone/not-cached-clip"])
    assert code == 2 and "--labeller unet" in capsys.readouterr().err


# --------------------------------------------------------------------------- refine, --save-maps
# FAST without --k: refine takes its segments from --masks
FAST_REFINE = ["--resolution", "128", "--num-inference-steps", "10", "--modulation-timestep", "201", "--quiet"]


def _photo(path, seed=0, size=(96, 140)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _upsample(labels, size):
    h, w = labels.shape
    return labels[(np.arange(size[0]) * h // size[0])[:, None], (np.arange(size[1]) * w // size[1])[None, :]]


def test_refine_reproduces_segment_from_its_own_lowres_labels(tiny_dir, tmp_path):
    """segment's low-res labels saved as a PNG (8-bit at the grid's size, 16-bit at the image's size with
    other ids, RGB colour-coded) give segment's labels back through `emerdiff refine`."""
    from emerdiff.viz import colorize

    img = _photo(tmp_path / "good.png")
    assert main(["segment", str(img), "--model", str(tiny_dir), "--out", str(tmp_path / "seg"), *FAST]) == 0
    expected = np.asarray(Image.open(tmp_path / "seg" / "good_labels.png"))
    low = np.load(tmp_path / "seg" / "good.npz")["lowres_labels"]
    assert low.shape[0] == low.shape[1] and len(np.unique(low)) >= 2
    Image.fromarray(low.astype(np.uint8), mode="L").save(tmp_path / "grid.png")
    big = (_upsample(low, (96, 140)) * 1000 + 7).astype(np.uint16)
    Image.fromarray(big).save(tmp_path / "big16.png")
    assert Image.open(tmp_path / "big16.png").mode.startswith("I")
    Image.fromarray(colorize(_upsample(low, (96, 140)))).save(tmp_path / "rgb.png")
    for name in ("grid", "big16", "rgb"):
        out = tmp_path / name
        k = str(len(np.unique(low)))
        assert main(["refine", str(img), "--masks", str(tmp_path / f"{name}.png"), "--model", str(tiny_dir),
                     "--out", str(out), *FAST_REFINE]) == 0, name
        got = np.asarray(Image.open(out / "good_labels.png"))
        data = np.load(out / "good.npz")
        if name == "rgb":  # ids follow the colours' order: the same labels up to a renaming
            pairs = set(zip(got.ravel().tolist(), expected.ravel().tolist()))
            assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}), name
        else:
            assert np.array_equal(got, expected), name
            assert np.array_equal(data["lowres_labels"], low), name
        assert len(np.unique(data["lowres_labels"])) == int(k)


def test_refine_refuses_bad_label_files_before_loading_a_model(tmp_path, capsys):
    img = _photo(tmp_path / "im.png")
    (tmp_path / "text.png").write_text("not a png")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((10, 40), np.uint8)).save(tmp_path / "narrow.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 140, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    cases = {"missing.png": "does not exist", "text.png": "cannot read", "empty.png": "empty (0 bytes)",
             "narrow.png": "aspect", "photo.png": "distinct values"}
    for name, message in cases.items():
        # a model that does not exist: the label file is refused first
        code = main(["refine", str(img), "--masks", str(tmp_path / name), "--model", str(tmp_path / "no_model"),
                     "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "error:" in err, (name, err)
    assert main(["refine", str(tmp_path / "nope.png"), "--masks", str(tmp_path / "narrow.png"),
                 "--model", str(tmp_path / "no_model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_read_label_map_modes(tmp_path):
    from emerdiff.cli.app import check_label_aspect, read_label_map
    from emerdiff.viz import label_png

    ids = np.array([[0, 3, 3], [5, 5, 0]])
    label_png(ids).save(tmp_path / "p.png")  # segment's own format: indexed palette
    assert read_label_map(tmp_path / "p.png").tolist() == ids.tolist()
    Image.fromarray(ids.astype(np.uint8), mode="L").convert("LA").save(tmp_path / "la.png")
    assert read_label_map(tmp_path / "la.png").tolist() == ids.tolist()
    grey_rgb = np.repeat((ids * 40).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey.png")  # a greyscale map saved as RGB keeps its values
    assert read_label_map(tmp_path / "grey.png").tolist() == (ids * 40).tolist()
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0]], np.uint8)[np.array([[0, 1, 1], [2, 2, 0]])]
    Image.fromarray(colours).convert("RGBA").save(tmp_path / "rgba.png")
    # ids in increasing colour order (R, G, B packed): (0, 200, 0) < (10, 20, 30) < (200, 0, 0)
    assert read_label_map(tmp_path / "rgba.png").tolist() == [[1, 2, 2], [0, 0, 1]]
    Image.fromarray(np.array([[0.0, 1.5]], np.float32), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match="whole numbers"):
        read_label_map(tmp_path / "f.tiff")
    check_label_aspect((48, 70), (96, 140))  # the image's aspect at half size
    check_label_aspect((16, 23), (96, 140))  # within one label pixel of rounding (23.3)
    check_label_aspect((16, 16), (96, 140))  # square: the model's view
    with pytest.raises(ValueError, match="aspect"):
        check_label_aspect((16, 30), (96, 140))


def test_segment_save_maps_writes_maps_and_contact_sheet(tiny_dir, tmp_path):
    import json

    import torch

    from emerdiff.method.readout import assign_labels, locality

    img = _photo(tmp_path / "good.png", seed=4)
    out = tmp_path / "o"
    assert main(["segment", str(img), "--model", str(tiny_dir), "--out", str(out), *FAST, "--save-maps"]) == 0
    seg = np.load(out / "good.npz")
    assert "difference_maps" not in seg.files  # the maps live in good_maps.npz, once, as float16
    z = np.load(out / "good_maps.npz")
    k = len(np.unique(seg["lowres_labels"]))
    assert z["maps"].dtype == np.float16 and z["maps"].shape == (k, 128, 128)
    assert z["mask_ids"].tolist() == list(range(k))
    assert np.array_equal(z["lowres_masks"], seg["lowres_labels"][None] == np.arange(k)[:, None, None])
    assert json.loads(str(z["config"])) == json.loads(str(seg["meta"]))["config"]
    maps = torch.from_numpy(z["maps"].astype(np.float32))
    masks = torch.from_numpy(z["lowres_masks"].reshape(k, -1).astype(np.float32))
    np.testing.assert_allclose(locality(maps, masks, seg["lowres_labels"].shape).numpy(), seg["locality"], atol=2e-3)
    sigma = json.loads(str(z["config"]))["blur_sigma"]
    labels_r = assign_labels(maps, sigma).numpy()  # the maps give (nearly) the labels the PNG holds
    from emerdiff.sd.images import resize_labels

    assert (resize_labels(labels_r, (96, 140)) == seg["labels"]).mean() > 0.98
    sheet = Image.open(out / "good_maps.png")
    assert sheet.size[0] > 300 and sheet.size[1] > 100
    assert json.loads(str(seg["meta"]))["faithfulness"]["locality"] == pytest.approx(float(seg["locality"].mean()))


def test_save_maps_failure_leaves_no_output(tiny_dir, tmp_path, monkeypatch, capsys):
    import sys

    import emerdiff.studies.sweep  # noqa: F401  (loaded, so that its contact_sheet can be replaced)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sys.modules["emerdiff.studies.sweep"], "contact_sheet", broken)
    img = _photo(tmp_path / "good.png", seed=5)
    out = tmp_path / "o"
    monkeypatch.delenv("EMERDIFF_DEBUG", raising=False)
    assert main(["segment", str(img), "--model", str(tiny_dir), "--out", str(out), *FAST, "--save-maps"]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: disk on fire" in err and "Traceback" not in err  # one line, not a trace
    assert list(out.iterdir()) == []  # neither the labels nor a temp file: the set is all or nothing


def test_refine_options_have_help_with_defaults(capsys):
    parser = _subcommands()["refine"]
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:  # hidden: deprecated aliases
            continue
        assert action.help, action.dest
        if action.option_strings:
            text = action.help.lower()
            assert "default" in text or (action.required and "required" in text), action.option_strings
    assert "--num-clusters" not in parser.format_help() and "--k" not in parser.format_help()  # from --masks
    assert _subcommands()["segment"].get_default("save_maps") is False


def test_set_reaches_every_config_field_in_segment_refine_and_evaluate():
    """One command line -> config path: --set FIELD=VALUE for any field, applied after the flags,
    and segment, refine and evaluate build the same config from the same arguments."""
    import dataclasses

    from emerdiff.cli.app import build_parser, config_from_args
    from emerdiff.config import EmerDiffConfig

    parser = build_parser()
    changed = {"blur_sigma": 2.5, "kmeans_n_init": 3, "lowres": "diffseg", "diffseg_kl_threshold": 0.03,
               "readout_steps": 2, "attention_injection": False, "query_layer": "down_blocks.1.attentions.0."
               "transformer_blocks.0.attn2", "feature_noise_draws": 2}
    sets = [x for k, v in changed.items() for x in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    common = ["--model", "tiny", *sets]
    seg = config_from_args(parser.parse_args(["segment", "x.png", "--num-clusters", "3", *common]))
    ref = config_from_args(parser.parse_args(["refine", "x.png", "--masks", "m.png", *common]))  # K from --masks
    ev = config_from_args(parser.parse_args(["evaluate", "--data", "d", "--out", "o", "--num-clusters", "3", *common]))
    assert seg == ev and dataclasses.replace(ref, num_clusters=3) == seg
    assert {k: getattr(seg, k) for k in changed} == changed and seg.num_clusters == 3
    # --set wins over the flag it names
    assert config_from_args(parser.parse_args(["segment", "x", "--num-clusters", "3", "--set", "num_clusters=6"])).num_clusters == 6
    names = {f.name for f in dataclasses.fields(EmerDiffConfig)}
    assert set(changed) <= names
    with pytest.raises(ValueError, match="unknown EmerDiffConfig field.*'nope'"):
        config_from_args(parser.parse_args(["segment", "x", "--set", "nope=1"]))
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        config_from_args(parser.parse_args(["segment", "x", "--set", "blur_sigma"]))
