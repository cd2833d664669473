"""Reliability round 3 (issue 27), the command-line side: hostile input meets the newer features,
and no traceback ever reaches a user.

Each test reproduces one case of the issue; refusals are checked before any model is loaded
(``no_model_load`` fails the test if one is) or any file is written. Segment runs use the
session's tiny model folder (``tiny_dir``) at the fast settings of test_reliability.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import test_reliability
import torch
from PIL import Image
from test_reliability import S, _png

from emerdiff import EmerDiffConfig, ImageError, load_image
from emerdiff.cli.app import main
from emerdiff.config import field_type_rule
from emerdiff.files import TEMP_SUFFIX, FileSet

no_model_load = test_reliability.no_model_load  # the fixture: any model load fails the test
R = [a for i, a in enumerate(S) if "--num-clusters" not in S[max(0, i - 1):i + 1]]  # refine takes no K


def _fast(tiny_dir: Path, refine: bool = False) -> list[str]:
    return [a if a != "tiny" else str(tiny_dir) for a in (R if refine else S)] + ["--threads", "1"]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- load_image: odd arrays and dtypes
@pytest.mark.parametrize("image", [np.zeros((0, 0)), np.zeros((0, 80, 3), np.uint8), torch.zeros(0, 0),
                                   torch.zeros(3, 0, 80)], ids=["np0x0", "np0x80x3", "torch0x0", "torch3x0x80"])
def test_load_image_refuses_an_empty_array(image):
    with pytest.raises(ImageError, match=r"empty.*at least 64x64"):
        load_image(image)


def test_load_image_takes_bfloat16_and_refuses_tensors_numpy_cannot_hold():
    """bfloat16 (no numpy dtype) is read like float32, not a TypeError; complex, sparse and quantized
    tensors are ImageErrors naming the dtype or layout."""
    x = torch.rand(3, 80, 96)
    bf = x.to(torch.bfloat16)
    assert torch.equal(load_image(bf), bf.float())
    assert torch.equal(load_image(bf.permute(1, 2, 0)), bf.float())  # HxWxC too
    with pytest.raises(ImageError, match="complex64"):
        load_image(x.to(torch.complex64))
    with pytest.raises(ImageError, match="sparse"):
        load_image(x.to_sparse())
    with pytest.raises(ImageError, match="quint8"):
        with pytest.warns(UserWarning):  # torch deprecates quantized tensors
            q = torch.quantize_per_tensor(x, 0.1, 0, torch.quint8)
        load_image(q)


def test_load_image_gives_an_image_or_an_image_error_for_any_array():
    """Property: over shapes x dtypes, load_image returns a (3, H, W) float tensor in [0, 1] or raises
    ImageError, never another exception."""
    dtypes = [np.uint8, np.uint16, np.int8, np.int64, np.float16, np.float32, np.float64, bool, np.complex64,
              np.uint32, object]
    shapes = [(0,), (80,), (80, 80), (80, 80, 0), (80, 80, 2), (80, 80, 3), (4, 80, 80), (1, 80, 80, 3), (0, 0, 3)]
    for shape in shapes:
        for dtype in dtypes:
            for make in (np.zeros, lambda s, d: torch.zeros(s, dtype=torch.from_numpy(np.zeros(1, d)).dtype)):
                try:
                    image = make(shape, dtype)
                except TypeError:  # no such torch dtype
                    continue
                try:
                    t = load_image(image)
                except ImageError:
                    continue
                assert t.dtype == torch.float32 and t.shape[0] == 3 and 0 <= float(t.min()) <= float(t.max()) <= 1


# --------------------------------------------------------------------------- segment on a full disk
def test_segment_on_a_full_disk_ends_in_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    """The second image's write hits ENOSPC half-way: one line, exit 1, the first image's set intact,
    nothing of the second and no temp file left."""
    imgs = [_png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)]
    out = tmp_path / "out"
    real_add = FileSet.add

    def add(self, path, write):
        def failing(tmp):
            Path(tmp).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", tmp)

        return real_add(self, path, failing if Path(path).name == "b_overlay.png" else write)

    monkeypatch.setattr(FileSet, "add", add)
    assert main(["segment", *map(str, imgs), "--out", str(out), *_fast(tiny_dir)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "b.png" in line and "No space left" in line and "disk is full" in line
    assert sorted(p.name for p in out.iterdir()) == ["a.npz", "a_labels.png", "a_overlay.png"]
    assert np.load(out / "a.npz")["labels"].shape == (64, 64)


# --------------------------------------------------------------------------- refine
def test_refine_refuses_more_segments_than_tokens(tiny_dir, tmp_path, capsys):
    """20 segments on the tiny model's 4x4 grid: refused before any work, nothing dropped silently."""
    masks = tmp_path / "m.png"
    Image.fromarray(np.repeat(np.arange(20, dtype=np.uint8), 4)[None].repeat(80, 0)).save(masks)  # 20 stripes
    img = _png(tmp_path / "img.png", size=(80, 80))
    out = tmp_path / "out"
    assert main(["refine", str(img), "--masks", str(masks), "--out", str(out), *_fast(tiny_dir, True)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(masks) in line and "20 segments" in line and "16 tokens" in line
    assert not out.exists()


def test_refine_maps_outputs_back_to_the_users_ids(tiny_dir, tmp_path, capsys):
    """Ids 10, 37, 200 (large) and 99 (one pixel): IMAGE_ids.json gives each output label its --masks id
    and names 99 as dropped."""
    import json

    img = _png(tmp_path / "img.png")
    labels = np.full((64, 64), 10, np.uint8)
    labels[:, 32:] = 37
    labels[40:, :] = 200
    labels[5, 5] = 99
    masks = tmp_path / "m.png"
    Image.fromarray(labels).save(masks)
    out = tmp_path / "out"
    assert main(["refine", str(img), "--masks", str(masks), "--out", str(out), *_fast(tiny_dir, True)]) == 0
    info = json.loads((out / "img_ids.json").read_text())
    assert sorted(info["mask_ids"]) == [10, 37, 200] and info["dropped_ids"] == [99]
    lowres = np.load(out / "img.npz")["lowres_labels"]
    for label, user in enumerate(info["mask_ids"]):  # each output segment lies on its id's region
        block = np.asarray(Image.fromarray(labels).resize(lowres.shape[::-1], Image.NEAREST))
        assert np.bincount(block[lowres == label]).argmax() == user
    assert "99" in capsys.readouterr().err


def test_refine_never_writes_over_its_own_input(tmp_path, capsys, no_model_load):
    img = _png(tmp_path / "img.png")
    out = tmp_path / "out"
    out.mkdir()
    masks = out / "img_labels.png"
    Image.fromarray(np.repeat(np.arange(4, dtype=np.uint8), 16)[None].repeat(64, 0)).save(masks)
    before = masks.read_bytes()
    assert main(["refine", str(img), "--masks", str(masks), "--out", str(out), *R]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.count(str(masks)) >= 2 and "--masks" in line  # the input and the output it would become
    assert masks.read_bytes() == before and sorted(out.iterdir()) == [masks]


# --------------------------------------------------------------------------- --save-maps: a folder in the way
def test_save_maps_with_a_folder_in_the_way_is_refused_before_any_output(tmp_path, capsys, no_model_load):
    img = _png(tmp_path / "img.png")
    out = tmp_path / "out"
    (out / "img_maps.png").mkdir(parents=True)
    assert main(["segment", str(img), "--out", str(out), "--save-maps", *S]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(out / "img_maps.png") in line and "folder" in line
    assert [p.name for p in out.iterdir()] == ["img_maps.png"]


def test_file_set_never_leaves_a_partial_set(tmp_path, monkeypatch):
    """A folder where an output goes: nothing renamed; a rename failing mid-way: the renamed ones removed."""
    import emerdiff.files

    def stage(marker_name="m.npz"):
        files = FileSet(tmp_path / marker_name)
        for name in ("a.png", "b.png", marker_name):
            files.add(tmp_path / name, lambda p: Path(p).write_bytes(b"x"))
        return files

    (tmp_path / "b.png").mkdir()
    with pytest.raises(IsADirectoryError, match="b.png is a folder"):
        stage().commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]  # no a.png, no marker, no temp
    (tmp_path / "b.png").rmdir()
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(emerdiff.files.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        stage().commit()
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.endswith(TEMP_SUFFIX) for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- every field's type
# A value of the wrong type for each annotation: through the API, and as a --set text
WRONG = {"bool": ("no", "maybe"), "int": (2.5, "2.5"), "float": ("fast", "fast"), "str": (3, None),
         "dict[str, Any]": ([1], "[1]"), "int | None": ("3", "2.5")}
FIELDS = [f for f in dataclasses.fields(EmerDiffConfig)]


def test_every_field_annotation_has_a_type_rule():
    """A new EmerDiffConfig field with a type check_types does not know must extend config._TYPE_RULES."""
    unknown = [(f.name, str(f.type)) for f in FIELDS if field_type_rule(str(f.type)) is None]
    assert not unknown, f"add these annotations to emerdiff.config._TYPE_RULES: {unknown}"


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_a_wrong_type_is_refused_through_the_api(field):
    annotation = str(field.type)
    bad = WRONG.get(annotation, WRONG.get(annotation.replace(" | None", ""), (None,)))[0]
    config = EmerDiffConfig(**{field.name: bad})
    with pytest.raises(ValueError, match=rf"^{field.name} must be .*got {re.escape(repr(bad))}"):
        config.check_values()


@pytest.mark.parametrize("field", [f for f in FIELDS if WRONG.get(str(f.type), (0, None))[1] is not None],
                         ids=lambda f: f.name)
def test_a_wrong_type_is_refused_through_set(tmp_path, capsys, no_model_load, field):
    img = _png(tmp_path / "img.png")
    out = tmp_path / "out"
    text = WRONG[str(field.type)][1]
    assert main(["segment", str(img), "--out", str(out), *S, "--set", f"{field.name}={text}"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--set {field.name}={text}" in line and "must be" in line
    assert not out.exists()


@pytest.mark.parametrize("text,value", [("no", False), ("false", False), ("0", False), ("Off", False),
                                        ("yes", True), ("true", True), ("1", True)])
def test_set_bool_is_stored_as_a_bool(text, value):
    from emerdiff.cli.app import build_parser, config_from_args

    args = build_parser().parse_args(["segment", "x.png", "--model", "tiny", "--set", f"attention_injection={text}"])
    assert config_from_args(args).attention_injection is value


# --------------------------------------------------------------------------- layers --resolution
@pytest.mark.parametrize("value,expect", [("-8", "multiple of 8 and >= 64"), ("0", "multiple of 8 and >= 64"),
                                          ("100", "multiple of 8 and >= 64"), ("136", "does not fit this model")])
def test_layers_refuses_a_resolution_segment_refuses(tmp_path, capsys, no_model_load, value, expect):
    assert main(["layers", "tiny", "--resolution", value]) == 2
    layers_line = _one_line_error(capsys.readouterr().err)
    assert expect in layers_line and value in layers_line
    # the same rule as segment's
    assert main(["segment", str(_png(tmp_path / "img.png")), "--out", str(tmp_path / "o"), "--model", "tiny",
                 "--resolution", value, "--quiet"]) == 2
    assert expect in capsys.readouterr().err


# --------------------------------------------------------------------------- figures --only
def test_figures_only_names_the_option_and_the_notebooks(tmp_path, capsys):
    folder = tmp_path / "nb"
    folder.mkdir()
    for name in ("00_quickstart", "04_paper_figures"):
        (folder / f"{name}.ipynb").write_text("{}")
    assert main(["figures", "--only", "99", "--notebooks", str(folder), "--out", str(tmp_path / "f")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "--only 99" in line and "00_quickstart" in line and "04_paper_figures" in line


# --------------------------------------------------------------------------- no traceback reaches a user
def _boom(args):
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x77 and 32x64)")


@pytest.mark.parametrize("command,argv,inputs", [
    ("segment", ["segment", "a.png", "b.png"], "a.png, b.png"),
    ("refine", ["refine", "a.png", "--masks", "m.png"], "a.png"),
    ("layers", ["layers", "some/model"], "some/model"),
    ("figures", ["figures"], "notebooks"),
    ("evaluate", ["evaluate", "--data", "D", "--out", "O"], "--data D"),
    ("compare", ["compare", "RA", "RB"], "RA and RB"),
])
def test_an_unexpected_error_is_one_line_and_debug_gives_the_trace(monkeypatch, capsys, command, argv, inputs):
    import emerdiff.cli.app as app
    import emerdiff.cli.evaluate as evaluate

    for module, name in ((app, "cmd_segment"), (app, "cmd_refine"), (app, "cmd_layers"), (app, "cmd_figures"),
                         (evaluate, "run"), (evaluate, "compare_command")):
        monkeypatch.setattr(module, name, _boom)
    monkeypatch.delenv("EMERDIFF_DEBUG", raising=False)
    assert main(argv) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert f"emerdiff {command}" in line and inputs in line and "RuntimeError: mat1 and mat2" in line
    assert "--debug" in line and "EMERDIFF_DEBUG=1" in line
    with pytest.raises(RuntimeError, match="mat1"):
        main(["--debug", *argv])
    with pytest.raises(RuntimeError, match="mat1"):
        main([*argv, "--debug"])
    monkeypatch.setenv("EMERDIFF_DEBUG", "1")
    with pytest.raises(RuntimeError, match="mat1"):
        main(argv)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import emerdiff.cli.app as app

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "cmd_segment", interrupt)
    assert main(["segment", "a.png"]) == 130
    assert "interrupted" in _one_line_error(capsys.readouterr().err)


def test_python_m_evaluate_main_is_guarded_too(monkeypatch, capsys):
    import emerdiff.cli.evaluate as evaluate

    monkeypatch.setattr(evaluate, "run", _boom)
    monkeypatch.delenv("EMERDIFF_DEBUG", raising=False)
    assert evaluate.main(["--data", "D", "--out", "O"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "emerdiff evaluate" in line and "--data D" in line and "RuntimeError" in line
    with pytest.raises(RuntimeError):
        evaluate.main(["--data", "D", "--out", "O", "--debug"])


def test_an_unexpected_error_in_one_image_skips_it_and_goes_on(tiny_dir, tmp_path, capsys, monkeypatch):
    """The per-image loop reports any failure of one image (here the matmul error of a mismatched model)
    with its type, and segments the next, exactly as for an unreadable image."""
    from emerdiff.method.pipeline import EmerDiff

    imgs = [_png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)]
    real = EmerDiff.segment
    seen = []

    def segment(self, image, **kwargs):
        seen.append(1)
        if len(seen) == 1:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return real(self, image, **kwargs)

    monkeypatch.setattr(EmerDiff, "segment", segment)
    out = tmp_path / "out"
    assert main(["segment", *map(str, imgs), "--out", str(out), *_fast(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"skipped {imgs[0]}: RuntimeError: mat1" in err
    assert (out / "b.npz").exists() and not (out / "a.npz").exists()
