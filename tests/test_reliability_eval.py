"""Reliability round 3 (issue 27), the evaluation, model-loading and sweep side: hostile input
to ``evaluate``, ``compare``, model folders and ``emerdiff.sweep`` gets a clear refusal naming the
input, the value and the fix, before any work or output; numbers that cannot carry meaning say so.

Each test reproduces one case of the issue; evaluate's tests use the fake segmenter of test_evaluate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import fake_segment, make_folder  # noqa: E402  (same tests folder)

from emerdiff.cli.app import main
from emerdiff.cli.evaluate import build_parser, run
from emerdiff.evaluation.records import record_path


def _args(data: Path, out: Path, *extra: str):
    return build_parser().parse_args(["--data", str(data), "--out", str(out), "--quiet", "--bootstrap", "100",
                                      *extra])


def _payload(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _never(image):
    raise AssertionError("an image was segmented although the run should have been refused")


# --------------------------------------------------------------------------- compare
def test_compare_refuses_other_pixels_under_the_same_ids(tmp_path, capsys):
    """Two runs over different pictures with the same ids and labels are not paired: the image hashes differ."""
    data = make_folder(tmp_path / "data", n=4)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    for stem in ("im01", "im03"):  # other pixels, same labels
        path = other / "images" / f"{stem}.png"
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] = 255 - pixels[0, 0]
        Image.fromarray(pixels).save(path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(_args(data, a), segment_fn=fake_segment) == 0
    assert run(_args(other, b), segment_fn=fake_segment) == 0
    assert main(["compare", str(a), str(b), "--bootstrap", "0"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    assert "2 of the 4 shared image id(s) have different image pixels" in captured.err
    assert "first 'im01'" in captured.err and "rerun" in captured.err
    assert main(["compare", str(a), str(a), "--bootstrap", "0"]) == 0  # the same run still pairs


TRUNCATED = object()  # marker: the run's own results.json cut in half


@pytest.mark.parametrize("content,expect", [
    ("[]", "JSON list"), ("", "unreadable"), ("{", "unreadable"), ("null", "JSON NoneType"), ("42", "JSON int"),
    ('"results"', "JSON str"), ("{}", "no 'config'"), ('{"config": []}', "'config' is a list"),
    ('{"config": {}}', "class_names"), ('{"config": {"class_names": []}}', "class_names"),
    ('{"config": {"class_names": ["a", 3]}}', "class_names"),
    ('{"config": {"class_names": ["a"], "image_ids": "im00"}}', "image_ids"),
    ('{"config": {"class_names": ["a"], "image_ids": ["im00", "im00"]}}', "twice"),
    ('{"config": {"class_names": ["a"], "ignore_index": "255"}}', "ignore_index"),
    ('{"config": {"class_names": ["a"], "protocol_seed": 1.5}}', "protocol_seed"),
    (TRUNCATED, "unreadable"),
    # a damaged per-image record of the run: the record named
    ("record:truncate", "unreadable"), ("record:empty", "unreadable"), ("record:garbage", "unreadable"),
])
def test_compare_refuses_a_malformed_results_json_or_record(tmp_path, capsys, content, expect):
    data = make_folder(tmp_path / "data", n=2)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(_args(data, a), segment_fn=fake_segment) == 0
    assert run(_args(data, b), segment_fn=fake_segment) == 0
    path = b / "results.json"
    if isinstance(content, str) and content.startswith("record:"):
        path = record_path(b, "im01")
        raw = path.read_bytes()
        path.write_bytes({"truncate": raw[: len(raw) // 2], "empty": b"", "garbage": b"no zip"}[content[7:]])
    else:
        text = path.read_text()
        path.write_text(text[: len(text) // 2] if content is TRUNCATED else content)
    for order in ((a, b), (b, a)):
        assert main(["compare", str(order[0]), str(order[1]), "--bootstrap", "0"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(path) in err and expect in err
        assert f"rerun `emerdiff evaluate` into {b}" in err  # the fix


# --------------------------------------------------------------------------- intervals that cannot carry meaning
@pytest.mark.parametrize("case", ["one_image", "two_copies_of_one", "spread"])
def test_no_zero_width_interval_without_spread(tmp_path, capsys, case):
    """One image, or images that score alike on every resample: no interval, and a note says why (results.json,
    results.csv and the printed table). Images that differ: every interval there, no note, no extra column."""
    data = make_folder(tmp_path / "data", n=6 if case == "spread" else 1)
    if case == "two_copies_of_one":
        for folder in ("images", "labels"):
            shutil.copy(data / folder / "im00.png", data / folder / "im01.png")
    out = tmp_path / "out"
    args = build_parser().parse_args(["--data", str(data), "--out", str(out), "--bootstrap", "50"])
    assert run(args, segment_fn=fake_segment) == 0
    payload = _payload(out)
    if case == "spread":  # the held-out tables' case: unchanged
        bilinear = [r for r in payload["rows"] if r["method"] == "bilinear"]
        assert bilinear and all(r["miou_lo"] < r["miou_hi"] and "interval_note" not in r for r in bilinear)
        assert all(f"{r['protocol']} bilinear:" not in " ".join(payload["notes"]) for r in bilinear)
        return
    why = "1 image(s)" if case == "one_image" else "zero spread"
    assert payload["rows"] and payload["notes"]
    for row in payload["rows"]:
        assert row["miou_lo"] is None and row["miou_hi"] is None and why in row["interval_note"]
    for per in payload["intervals"].values():
        for v in per.values():
            assert v["lo"] is None and v["hi"] is None and why in v["note"]
    lines = (out / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "interval_note" in header
    for line in lines[1:]:
        assert line.split(",")[header.index("miou_lo")] == "" and why.split(" ")[0] in line
    err = capsys.readouterr().err
    assert "[no interval]" in err and "note: no interval" in err and "[100.00, 100.00]" not in err


def test_interval_rule():
    from emerdiff.evaluation.bootstrap import interval

    spread = np.array([50.0, 40.0, 60.0, 55.0])
    assert interval(spread, num_images=5)["lo"] < interval(spread, num_images=5)["hi"]
    for draws, n in ((spread, 1), (np.full(5, 50.0), 7), (np.array([50.0, 50.0 + 1e-12]), 3)):
        v = interval(draws, num_images=n)
        assert np.isnan(v["lo"]) and np.isnan(v["hi"]) and v["note"].startswith("no interval") and v["value"] == 50.0


# --------------------------------------------------------------------------- labels all void
@pytest.mark.parametrize("how", ["all_255", "other_ignore"])
def test_all_void_labels_refused_before_any_image(tmp_path, capsys, how):
    data = make_folder(tmp_path / "data", n=3)
    for path in (data / "labels").iterdir():
        label = np.asarray(Image.open(path))
        Image.fromarray(np.full_like(label, 7 if how == "other_ignore" else 255)).save(path)
    out = tmp_path / "out"
    extra = ("--ignore-index", "7") if how == "other_ignore" else ()
    with pytest.raises(ValueError) as err:
        run(_args(data, out, *extra), segment_fn=_never)
    msg = str(err.value)
    ignore = "7" if how == "other_ignore" else "255"
    assert "every pixel" in msg and f"ignore index {ignore}" in msg and "--ignore-index" in msg
    assert not out.exists()  # no run.json, no per_image/
    assert main(["evaluate", "--data", str(data), "--out", str(out), "--quiet", *extra]) == 2  # no model load
    assert "void" in capsys.readouterr().err and not out.exists()


def test_a_run_that_fails_every_image_leaves_no_run_json(tmp_path):
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"

    def broken(image):
        raise RuntimeError("the model fell over")

    with pytest.raises(ValueError, match="all 2 image.*failed.*RuntimeError: the model fell over"):
        run(_args(data, out), segment_fn=broken)
    assert not (out / "run.json").exists() and not (out / "per_image").exists()


# --------------------------------------------------------------------------- classes.txt
@pytest.mark.parametrize("text,expect", [
    ("sky\nroad\nsky\n", ["'sky' appears twice", "lines 1 and 3"]),
    ("sky\nroad\nSky\n", ["'Sky' appears twice", "lines 1 and 3"]),
    ("sky\n road\nroad \n", ["'road' appears twice", "lines 2 and 3"]),
    ("big  tree\nbig tree\n", ["'big tree' appears twice", "lines 1 and 2"]),
    ("sky\n\nroad\n", ["line(s) [2] are blank"]),
    ("\nsky\nroad\n", ["line(s) [1] are blank"]),
    ("sky\n   \nroad\n\t\ncar\n", ["line(s) [2, 4] are blank"]),
    ("sky\r\n\r\nroad\r\n", ["line(s) [2] are blank"]),
    ("", ["lists no classes"]), ("\n\n  \n", ["lists no classes"]),
])
def test_classes_txt_refusals_blame_classes_txt(tmp_path, capsys, text, expect):
    data = make_folder(tmp_path / "data", n=2)
    (data / "classes.txt").write_bytes(text.encode())
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        run(_args(data, out), segment_fn=_never)
    msg = str(err.value)
    assert str(data / "classes.txt") in msg and all(e in msg for e in expect) and "labels" not in msg.split(":")[0]
    assert not out.exists()
    assert main(["evaluate", "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert "classes.txt" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["red\ngreen\nblue\nyellow\n\n\n", "\ufeffred\ngreen\nblue\nyellow", " red \ngreen\n"
                                  "blue\nyellow\n"])
def test_classes_txt_harmless_variants_keep_the_ids(tmp_path, text):
    """Trailing blank lines, a BOM, spaces around a name: accepted, ids unchanged."""
    from emerdiff.evaluation.datasets import folder_dataset

    data = make_folder(tmp_path / "data", n=2)
    (data / "classes.txt").write_text(text, encoding="utf-8")
    assert folder_dataset(data).class_names == ("red", "green", "blue", "yellow")


def test_label_value_beyond_the_class_list_names_classes_txt(tmp_path):
    data = make_folder(tmp_path / "data", n=2)
    (data / "classes.txt").write_text("red\ngreen\nblue\n")  # yellow (3) is used by the labels
    with pytest.raises(ValueError, match=r"\[3\] are neither class ids 0..2 \(.*classes.txt lists 3\)"):
        run(_args(data, tmp_path / "out"), segment_fn=_never)


# --------------------------------------------------------------------------- one image's unexpected error
@pytest.mark.parametrize("error", [RuntimeError("matmul shapes"), KeyError("labels"), ZeroDivisionError("x"),
                                   TypeError("bad"), MemoryError()])
def test_unexpected_error_of_one_image_is_reported_and_the_run_goes_on(tmp_path, capsys, error):
    data = make_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"

    def flaky(image):
        if Path(image).stem == "im02":
            raise error
        return fake_segment(image)

    assert run(_args(data, out), segment_fn=flaky) == 1
    err = capsys.readouterr().err
    kind = type(error).__name__
    assert "failed im02" in err and kind in err
    assert "1 of 4 image(s) failed" in err
    payload = _payload(out)
    assert payload["config"]["image_ids"] == ["im00", "im01", "im03"] and payload["config"]["num_images"] == 3
    assert list(payload["config"]["failed_images"]) == ["im02"]
    assert payload["config"]["failed_images"]["im02"].startswith(kind)
    assert not record_path(out, "im02").exists()
    # a rerun with a working segmenter completes the missing image only
    assert run(_args(data, out), segment_fn=fake_segment) == 0
    assert "failed_images" not in _payload(out)["config"] and _payload(out)["config"]["num_images"] == 4


def test_unreadable_image_fails_alone(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=3)
    (data / "images" / "im01.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    assert run(_args(data, out), segment_fn=fake_segment) == 1
    err = capsys.readouterr().err
    assert "failed im01" in err and "1 of 3 image(s) failed" in err
    assert _payload(out)["config"]["image_ids"] == ["im00", "im02"]


# --------------------------------------------------------------------------- model folders
def _tiny_copy_with_unet(tiny_dir: Path, folder: Path, **changes) -> Path:
    """The tiny model with a UNet of other config values (random weights of that shape)."""
    from diffusers import UNet2DConditionModel

    from emerdiff.sd.components import TINY_UNET_CONFIG

    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(**{**TINY_UNET_CONFIG, **changes}).save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def test_cross_attention_dim_mismatch_refused_at_load(tiny_dir, tmp_path):
    from emerdiff import ModelLoadError, load_pipeline

    folder = _tiny_copy_with_unet(tiny_dir, tmp_path / "mixed", cross_attention_dim=48)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(folder, device="cpu")
    msg = str(err.value)
    assert "cross_attention_dim 48" in msg and "hidden_size 32" in msg and str(folder) in msg


def test_cross_attention_dim_mismatch_refused_before_evaluate_writes(tiny_dir, tmp_path):
    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.runner import run_evaluation

    folder = _tiny_copy_with_unet(tiny_dir, tmp_path / "mixed", cross_attention_dim=48)
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="cross_attention_dim 48"):
        run_evaluation(data, str(folder), EmerDiffConfig.for_model("tiny", resolution=64), out, quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("part,key,value,expect", [
    ("vae", "latent_channels", 8, ["in_channels 4", "latent_channels 8"]),
    ("unet", "in_channels", 9, ["in_channels 9", "latent_channels 4", "inpainting"]),
    ("unet", "out_channels", 8, ["out_channels 8", "latent_channels 4"]),
    ("vae", "in_channels", 1, ["VAE's in_channels is 1", "RGB"]),
    ("text_encoder", "hidden_size", 64, ["cross_attention_dim 32", "hidden_size 64"]),
    ("unet", "cross_attention_dim", [32, 32, 16, 32], ["cross_attention_dim [32, 32, 16, 32]", "hidden_size 32"]),
])
def test_mismatched_component_configs_refused_before_weights(tiny_dir, tmp_path, part, key, value, expect):
    """A config.json that no longer fits the others: refused from the configs, naming both numbers and the folder."""
    from emerdiff import ModelLoadError, load_pipeline

    folder = tmp_path / "edited"
    shutil.copytree(tiny_dir, folder)
    path = folder / part / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(folder, device="cpu")
    msg = str(err.value)
    assert str(folder) in msg and all(e in msg for e in expect), msg


def test_component_check_accepts_the_shipped_models(tiny_model):
    from emerdiff.sd.components import SD15_UNET_CONFIG, SD_VAE_CONFIG, SDXL_UNET_CONFIG
    from emerdiff.sd.layers import check_component_configs, check_model_configs

    check_model_configs("reference")
    check_component_configs(tiny_model.unet.config, tiny_model.vae.config, tiny_model.text_encoder.config)
    check_component_configs(SD15_UNET_CONFIG, SD_VAE_CONFIG, {"hidden_size": 768})
    check_component_configs(SDXL_UNET_CONFIG, SD_VAE_CONFIG, {"hidden_size": 768}, {"hidden_size": 1280})


# --------------------------------------------------------------------------- emerdiff.sweep
@pytest.fixture(scope="module")
def sweep_ed(tiny_model):
    from emerdiff import EmerDiff, EmerDiffConfig

    return EmerDiff(tiny_model, EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10,
                                               modulation_timestep=201))


@pytest.mark.parametrize("kwargs,expect", [
    (dict(timesteps=[201.7]), "timesteps: 201.7"), (dict(timesteps=[True]), "timesteps: True"),
    (dict(timesteps=201.7), "timesteps: 201.7"), (dict(timesteps=False), "timesteps: False"),
    (dict(timesteps=[201.0]), "timesteps: 201.0"), (dict(timesteps=["201"]), "timesteps: '201'"),
    (dict(timesteps=[np.float32(201)]), "(float32) is not an integer"), (dict(timesteps=[None]), "timesteps: None"),
    (dict(timesteps={201: 1}), "timesteps={201: 1}"), (dict(timesteps=[]), "timesteps=[]"),
    (dict(strengths=[True]), "strengths: True"), (dict(strengths=["10"]), "strengths: '10'"),
    (dict(strengths=[float("nan")]), "strengths: nan"), (dict(strengths=[float("inf")]), "strengths: inf"),
    (dict(layers=[3]), "layers: 3"), (dict(layers=[""]), "layers: ''"), (dict(layers=[None]), "layers: None"),
    (dict(masks=[1.5]), "masks: 1.5"), (dict(masks=[True]), "masks: True"),
])
def test_sweep_values_of_the_wrong_type_are_refused(sweep_ed, monkeypatch, kwargs, expect):
    import emerdiff.studies.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "load_image", _never)  # refused before the image is even read
    with pytest.raises(ValueError) as err:
        sweep_module.sweep("photo.png", ed=sweep_ed, progress=False, **kwargs)
    assert expect in str(err.value)


TRUNCATED_META = object()


@pytest.mark.parametrize("content,expect", [
    ("[]", "JSON list"), ("", "unreadable"), ('{"request": {', "unreadable"), ("null", "JSON NoneType"),
    ("{}", "'request'"), ('{"request": [], "mask_ids": [0]}', "'request'"),
    ('{"request": {}, "mask_ids": "0,1"}', "mask_ids"), ('{"request": {}, "mask_ids": []}', "mask_ids"),
    ('{"request": {}, "mask_ids": [0, 1.5]}', "mask_ids"), ('{"request": {}, "mask_ids": [0]}', "lowres_labels"),
    (TRUNCATED_META, "unreadable"),
])
def test_malformed_sweep_json_names_the_file_and_the_fix(sweep_ed, tmp_path, content, expect):
    from emerdiff.studies.sweep import META, sweep

    out = tmp_path / "sweep"
    out.mkdir()
    image = np.zeros((64, 64, 3), np.uint8)
    if content is TRUNCATED_META:
        good = json.dumps({"request": {"format": 1, "image": "x" * 64}, "mask_ids": [0, 1, 2],
                           "lowres_labels": [[0] * 16] * 16}, indent=1)
        content = good[: len(good) // 2]
    (out / META).write_text(content)
    with pytest.raises(ValueError) as err:
        sweep(image, ed=sweep_ed, out=out, progress=False)
    msg = str(err.value)
    assert str(out / META) in msg and expect in msg and "rerun the sweep" in msg and f"delete {out}" in msg


def test_sweep_records_that_are_not_rows_are_dropped(tmp_path):
    from emerdiff.studies.sweep import RECORDS, _read_records

    good = {"setting": "s", "mask": 0, "locality": 0.5}
    (tmp_path / RECORDS).write_text("\n".join([json.dumps(good), "[]", "5", '{"setting": 3, "mask": 0}',
                                               '{"mask": 1}', '{"setting": "s", "mask": "0"}', '{"cut'])
                                    + "\n")
    assert _read_records(tmp_path) == [good]
    assert (tmp_path / RECORDS).read_text() == json.dumps(good) + "\n"  # rewritten without them


@pytest.mark.parametrize("kwargs", [dict(timesteps=[201.7]), dict(timesteps=[True]), dict(strengths=["10"])])
def test_sweep_refuses_a_wrong_type_before_loading_a_named_model(monkeypatch, kwargs):
    import emerdiff.sd.loading
    from emerdiff.studies.sweep import sweep

    def refuse(*args, **kw):
        raise AssertionError("the model was loaded although a swept value has the wrong type")

    monkeypatch.setattr(emerdiff.sd.loading, "load_pipeline", refuse)
    with pytest.raises(ValueError, match="is not"):
        sweep("photo.png", model="tiny", progress=False, **kwargs)
