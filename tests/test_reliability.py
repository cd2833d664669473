"""Reliability (issue 15): no silent wrong result, no stale or mixed cache, outputs a user can share.

Each test reproduces one case of the issue. Settings errors are checked before
any model is loaded (``no_model_load`` fails the test if one is) or any file is
written; evaluate's cache tests use the fake segmenter of test_evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import fake_segment, make_folder  # noqa: E402  (same tests folder)

from emerdiff import EmerDiff, EmerDiffConfig
from emerdiff.cli.app import main
from emerdiff.cli.evaluate import build_parser, run
from emerdiff.evaluation.records import load_record, record_path

S = ["--model", "tiny", "--resolution", "128", "--num-clusters", "4", "--num-inference-steps", "10", "--modulation-timestep", "201",
     "--quiet"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a diffusion model fails the test."""
    import emerdiff.sd.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the settings are invalid")

    monkeypatch.setattr(emerdiff.sd.loading, "load_pipeline", refuse)


@pytest.fixture
def fake_model(monkeypatch):
    """`emerdiff evaluate` segments with the fake segmenter (settings are still checked for real)."""
    from emerdiff.evaluation import runner as evaluate_command

    monkeypatch.setattr(evaluate_command, "_default_segmenter",
                        lambda args, device: (fake_segment, {"fake": True}, None))


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _eval(data: Path, out: Path, *extra: str) -> list[str]:
    # 100 resamples, not 1000: the intervals are still computed (and cached results still merged
    # through them) at a tenth of the time; --bootstrap in extra overrides
    return ["evaluate", "--data", str(data), "--out", str(out), "--quiet", "--bootstrap", "100", *extra]


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


# --------------------------------------------------------------------------- settings checked up front
@pytest.mark.parametrize("option,value,expect", [
    ("--modulation-strength", "nan", "finite"), ("--modulation-strength", "inf", "finite"), ("--modulation-strength", "0", "is 0"),
    ("--modulation-strength", "1e30", "must lie in"),
    ("--num-inference-steps", "0", "between 1 and 1000"), ("--num-inference-steps", "-3", "between 1 and 1000"),
    ("--blur-sigma", "nan", "finite"), ("--blur-sigma", "1e9", "resolution/8"),
    ("--resolution", "120", "multiple of 64"),
])
def test_segment_rejects_bad_settings_before_loading(tmp_path, capsys, no_model_load, option, value, expect):
    img = _png(tmp_path / "img.png")
    out = tmp_path / "out"
    args = [a for a in S]
    if option in args:
        i = args.index(option)
        args[i + 1] = value
    else:
        args += [option, value]
    assert main(["segment", str(img), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert expect in err and value.lstrip("-").split("e")[0] in err  # names the value
    assert not out.exists()  # nothing written


def test_resolution_must_fit_the_unet():
    """SD (VAE x8, UNet x8): 520 gives a 65-latent the UNet cannot halve three times."""
    with pytest.raises(ValueError, match="multiple of 64.*use 512 or 576"):
        EmerDiffConfig(resolution=520).check_resolution(8, 8)
    EmerDiffConfig(resolution=512).check_resolution(8, 8)


def test_resolution_checked_against_the_loaded_model(tiny_model):
    with pytest.raises(ValueError, match="resolution=120 does not fit this model"):
        EmerDiffConfig(resolution=120, num_clusters=4).validate(tiny_model)


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_segment_checks_out_before_any_work(tmp_path, capsys, no_model_load, monkeypatch, where):
    img = _png(tmp_path / "img.png")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = {"file": blocker, "under_file": blocker / "sub", "read_only": tmp_path / "ro" / "out"}[where]
    if where == "read_only":
        (tmp_path / "ro").mkdir()
        import emerdiff.files

        # the tests may run as root, for whom chmod does not stop writes: fake the permission check
        real = os.access
        monkeypatch.setattr(emerdiff.files.os, "access",
                            lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    assert main(["segment", str(img), "--out", str(out), *S]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and {"file": "is a file", "under_file": "which is a file",
                                "read_only": "not writable"}[where] in err


def test_evaluate_rejects_nan_strength_before_loading_or_writing(tmp_path, capsys, no_model_load):
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    for value in ("nan", "NaN", "0"):
        assert main(_eval(data, out, "--set", f"modulation_strength={value}")) == 2
        assert "modulation_strength" in capsys.readouterr().err
    assert not out.exists()  # no run.json that would refuse the corrected rerun


def test_run_json_written_only_after_the_model_accepted_the_settings(tmp_path, capsys):
    """A timestep off the schedule is only known once the scheduler is loaded: the refused run
    must leave no run.json, so the corrected rerun is not refused."""
    torch.set_num_threads(1)
    data = make_folder(tmp_path / "data", n=1)
    out = tmp_path / "out"
    tiny = ["--model", "tiny", "--resolution", "64", "--num-clusters", "3", "--device", "cpu",
            "--set", "num_inference_steps=10", "--protocol", "concept"]
    assert main(_eval(data, out, *tiny, "--set", "modulation_timestep=290")) == 2
    assert "not on the 10-step schedule" in capsys.readouterr().err
    assert not (out / "run.json").exists()
    assert main(_eval(data, out, *tiny, "--set", "modulation_timestep=201")) == 0
    assert json.loads((out / "run.json").read_text())["method_config"]["modulation_timestep"] == 201


def test_refusal_names_the_keys_that_differ(tmp_path, capsys, fake_model):
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    assert main(_eval(data, out, "--set", "blur_sigma=2")) == 0
    assert main(_eval(data, out, "--set", "blur_sigma=3")) == 2
    err = capsys.readouterr().err
    assert "method_config.blur_sigma: 2 in run.json, 3 now" in err


def test_missing_dataset_folder_or_classes_file(tmp_path, capsys, no_model_load):
    assert main(_eval(tmp_path / "nope", tmp_path / "o1")) == 2
    assert "dataset folder does not exist" in capsys.readouterr().err
    data = make_folder(tmp_path / "data", n=1)
    (data / "classes.txt").unlink()
    assert main(_eval(data, tmp_path / "o2")) == 2
    assert "classes.txt is missing" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_corrupt_text_encoder_weights_give_a_clean_message(tiny_dir, tmp_path, damage):
    from emerdiff import load_pipeline
    from emerdiff.sd.loading import ModelLoadError

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = next((model / "text_encoder").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ModelLoadError, match="corrupt or empty"):
        load_pipeline(model, device="cpu")


# --------------------------------------------------------------------------- no silent wrong result
def test_difference_map_checks():
    from emerdiff.method.readout import DegenerateResult, check_difference_maps

    maps = torch.rand(3, 8, 8)
    check_difference_maps(maps)
    maps[1, 2, 2] = float("nan")
    with pytest.raises(DegenerateResult, match=r"segment\(s\) \[1\] contain NaN"):
        check_difference_maps(maps)
    with pytest.raises(DegenerateResult, match="nearly\\) zero"):
        check_difference_maps(torch.full((3, 8, 8), 1e-5))


def test_segment_refuses_nan_difference_maps(tiny_model, fast_config, photo, monkeypatch):
    """Maps that overflowed must not become an all-zero labelling with a normal summary."""
    import emerdiff.method.pipeline as pipeline

    real = pipeline.difference_maps

    def overflowing(*args, **kwargs):
        maps, images = real(*args, **kwargs)
        return maps * float("nan"), images

    monkeypatch.setattr(pipeline, "difference_maps", overflowing)
    with pytest.raises(ValueError, match="NaN or infinite"):
        EmerDiff(tiny_model, fast_config).segment(photo, progress=False)


def test_api_segment_refuses_zero_strength(tiny_model, fast_config, photo):
    with pytest.raises(ValueError, match="modulation_strength .* is 0"):
        EmerDiff(tiny_model, fast_config.replace(modulation_strength=0.0)).segment(photo, progress=False)


@pytest.mark.parametrize("values,expect", [([0.0, 2.5], "must lie in \\[0, 1\\]"),
                                           ([0.0, float("nan")], "NaN or infinite")])
def test_float_tiff_outside_unit_range_or_nan_is_rejected(tmp_path, values, expect):
    from emerdiff.sd.images import ImageError, load_image

    arr = np.full((64, 64), 0.5, np.float32)
    arr[0, 0], arr[5, 5] = values
    path = tmp_path / "f.tif"
    Image.fromarray(arr, mode="F").save(path)
    assert Image.open(path).mode == "F"
    with pytest.raises(ImageError, match=expect):
        load_image(path)
    arr[0, 0], arr[5, 5] = 0.0, 1.0
    Image.fromarray(arr, mode="F").save(path)
    assert float(load_image(path).max()) == 1.0  # in-range float TIFFs still load


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a few hundred bytes; decoding would fail)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    from emerdiff.sd.images import MAX_PIXELS, ImageError, load_image

    big = _png_header_only(tmp_path / "big.png", 12000, 12000)
    with pytest.raises(ImageError, match="12000x12000 = 144.0 megapixels, above the limit of 50.0 MP"):
        load_image(big)  # refused from the header: no 12 GB decode, no Pillow warning
    small = _png(tmp_path / "small.png", size=(100, 100))
    with pytest.raises(ImageError, match="EMERDIFF_MAX_PIXELS"):
        load_image(small, max_pixels=5000)
    monkeypatch.setenv("EMERDIFF_MAX_PIXELS", "5000")
    with pytest.raises(ImageError, match="above the limit of 0.0 MP"):
        load_image(np.zeros((100, 100, 3), np.uint8))
    monkeypatch.setenv("EMERDIFF_MAX_PIXELS", str(MAX_PIXELS * 10))
    with pytest.raises(ImageError, match="cannot read"):  # over our default, under the raised limit
        load_image(_png_header_only(tmp_path / "b2.png", 9000, 9000))


# --------------------------------------------------------------------------- segment outputs
def test_duplicate_output_stems_get_distinct_outputs(tiny_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    inputs = [_png(tmp_path / "d1" / "x.png", 1), _png(tmp_path / "d2" / "x.png", 2)]
    jpg = tmp_path / "d2" / "x.jpg"
    Image.open(inputs[0]).save(jpg)
    out = tmp_path / "out"
    fast = [a if a != "tiny" else str(tiny_dir) for a in S]
    assert main(["segment", *map(str, inputs), str(jpg), "--out", str(out), *fast]) == 0
    for stem in ("x", "x-2", "x-3"):
        assert (out / f"{stem}.npz").exists() and (out / f"{stem}_labels.png").exists()
    labels = [np.load(out / f"{s}.npz")["labels"] for s in ("x", "x-2")]
    assert not np.array_equal(labels[0], labels[1])  # two different images, two results
    assert "writing x-2_*" in capsys.readouterr().err


def test_unique_stems_never_reuse_an_input_name():
    from emerdiff.files import unique_stems

    assert unique_stems(["a/x.png", "b/x.png", "x-2.png", "c/x.jpg"]) == ["x", "x-3", "x-2", "x-4"]


def test_outputs_get_normal_permissions_and_stale_temps_are_cleaned(tiny_dir, tmp_path, umask022, capsys):
    torch.set_num_threads(1)
    img = _png(tmp_path / "img.png")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".img_overlay.png.{_dead_pid()}-deadbeef.emerdiff-tmp"
    stale.write_bytes(b"half a png")
    fast = [a if a != "tiny" else str(tiny_dir) for a in S]
    assert main(["segment", str(img), "--out", str(out), *fast]) == 0
    assert not stale.exists() and "temp file left by an interrupted run" in capsys.readouterr().err
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["img.npz", "img_labels.png", "img_overlay.png"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_temp_files_are_hidden_from_globs_and_live_writers_keep_theirs(tmp_path, umask022):
    from emerdiff.files import FileSet, clean_stale_temps, write_atomic

    seen = []
    write_atomic(tmp_path / "a.png", lambda p: (seen.append(sorted(tmp_path.glob("*.png"))),
                                                 Path(p).write_bytes(b"x")))
    assert seen == [[]]  # while writing, glob('*.png') sees no temp file
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644
    live = tmp_path / f".b.png.{os.getpid()}-0123abcd.emerdiff-tmp"
    live.write_bytes(b"")
    mine = tmp_path / ".notes.txt"
    mine.write_text("a user's hidden file")
    assert clean_stale_temps([tmp_path]) == [] and live.exists() and mine.exists()
    # an output set: the marker (.npz) is renamed last; aborted sets leave nothing
    files = FileSet(tmp_path / "s.npz")
    files.add(tmp_path / "s.npz", lambda p: Path(p).write_bytes(b"npz"))
    files.add(tmp_path / "s_labels.png", lambda p: Path(p).write_bytes(b"png"))
    assert not (tmp_path / "s.npz").exists()
    files.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, mine.name, "a.png"]
    files = FileSet(tmp_path / "s.npz")
    files.add(tmp_path / "s.npz", lambda p: Path(p).write_bytes(b"npz"))
    files.add(tmp_path / "s_labels.png", lambda p: Path(p).write_bytes(b"png"))
    assert [p.name for p in files.commit()] == ["s.npz", "s_labels.png"]
    assert (tmp_path / "s.npz").read_bytes() == b"npz"


# --------------------------------------------------------------------------- evaluate's cache
def _args(data: Path, out: Path, *extra: str):
    return build_parser().parse_args(_eval(data, out, *extra)[1:])


def _counting():
    seen: list = []

    def segment(image):
        seen.append(str(image))
        return fake_segment(image)

    return seen, segment


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "old_version"])
def test_bad_cache_record_is_recomputed_with_one_line(tmp_path, capsys, damage):
    data = make_folder(tmp_path / "data", n=4)
    clean = tmp_path / "clean"
    run(_args(data, clean, "--protocol", "all"), segment_fn=fake_segment)
    out = tmp_path / "out"
    run(_args(data, out, "--protocol", "all"), segment_fn=fake_segment)
    target = record_path(out, "im00")
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "foreign":  # another image's record under this image's name
        shutil.copy(record_path(out, "im01"), target)
    else:
        with np.load(target) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["version"] = np.array(1)
        np.savez_compressed(target, **arrays)
    capsys.readouterr()
    seen, counting = _counting()
    assert run(_args(data, out, "--protocol", "all"), segment_fn=counting) == 0
    assert len(seen) == 1 and seen[0].endswith("im00.png")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recomputing")]
    assert len(err) == 1 and "im00" in err[0] and str(target) in err[0]
    assert _rows(out) == _rows(clean)
    assert load_record(target).image_id == "im00"


def test_labels_edited_in_place_are_noticed(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=3)
    out = tmp_path / "out"
    run(_args(data, out, "--protocol", "concept"), segment_fn=fake_segment)
    before = _rows(out)
    label = data / "labels" / "im01.png"
    arr = np.asarray(Image.open(label)).copy()
    arr[arr != 255] = (arr[arr != 255] + 1) % 4  # every class shifted: a different ground truth
    Image.fromarray(arr).save(label)
    capsys.readouterr()
    seen, counting = _counting()
    assert run(_args(data, out, "--protocol", "concept"), segment_fn=counting) == 0
    assert len(seen) == 1 and seen[0].endswith("im01.png")
    assert "other labels" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    run(_args(data, fresh, "--protocol", "concept"), segment_fn=fake_segment)
    assert _rows(out) == _rows(fresh) and _rows(out) != before


def test_records_of_other_settings_are_recomputed(tmp_path, capsys, fake_model):
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    assert main(_eval(data, out, "--set", "blur_sigma=2")) == 0
    (out / "run.json").unlink()  # e.g. a run killed before it was written, or deleted by hand
    capsys.readouterr()
    assert main(_eval(data, out, "--set", "blur_sigma=3")) == 0
    assert capsys.readouterr().err.count("was computed with other settings") == 2


def test_image_ids_do_not_collide(tmp_path, capsys):
    from emerdiff.evaluation.records import safe_id as _safe_id

    data = make_folder(tmp_path / "data", n=2)
    for kind in ("images", "labels"):
        os.rename(data / kind / "im00.png", data / kind / "x y.png")
        os.rename(data / kind / "im01.png", data / kind / "x_y.png")
    out = tmp_path / "out"
    assert run(_args(data, out, "--protocol", "concept"), segment_fn=fake_segment) == 0
    assert len(list((out / "per_image").glob("*.npz"))) == 2
    assert load_record(record_path(out, "x y")).image_id == "x y"
    assert load_record(record_path(out, "x_y")).image_id == "x_y"
    seen, counting = _counting()
    assert run(_args(data, out, "--protocol", "concept"), segment_fn=counting) == 0
    assert seen == []  # both cached, neither replaced the other
    ids = ["x y", "x_y", "x%20y", ".hidden", "a/b", "é", "x" * 300, "x" * 301]
    names = [_safe_id(i) for i in ids]
    assert len(set(names)) == len(ids) and not any(n.startswith(".") for n in names)
    assert all(len(n.encode()) <= 200 for n in names)


def test_stale_evaluate_temps_are_cleaned(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    (out / "per_image").mkdir(parents=True)
    stale = out / "per_image" / f".im00.npz.{_dead_pid()}-0badf00d.emerdiff-tmp"
    stale.write_bytes(b"partial")
    assert run(_args(data, out, "--protocol", "concept"), segment_fn=fake_segment) == 0
    assert not stale.exists() and "temp file left by an interrupted run" in capsys.readouterr().err


def test_evaluate_outputs_get_normal_permissions(tmp_path, umask022):
    data = make_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    run(_args(data, out, "--protocol", "concept"), segment_fn=fake_segment)
    written = [out / "results.json", out / "results.csv", out / "run.json", *(out / "per_image").iterdir()]
    assert len(written) == 5
    for f in written:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --------------------------------------------------------------------------- security
def test_no_environment_hook_runs_code(tmp_path, monkeypatch, fake_model):
    """The old EMERDIFF_TEST_SEGMENTER hook imported and ran any file it named."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef factory(args):\n    return None\n")
    monkeypatch.setenv("EMERDIFF_TEST_SEGMENTER", f"{evil}:factory")
    data = make_folder(tmp_path / "data", n=1)
    assert main(_eval(data, tmp_path / "out", "--protocol", "concept")) == 0
    assert not marker.exists()
    package = Path(__file__).resolve().parents[1] / "emerdiff"
    for source in package.rglob("*.py"):
        text = source.read_text()
        assert "EMERDIFF_TEST_SEGMENTER" not in text and "spec_from_file_location" not in text, source
