"""Dataset adapters on small synthetic folders in each benchmark layout, tables, samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emerdiff.evaluation.datasets import (
    LAYOUTS,
    Sample,
    load_probe_images,
    load_table,
    map_pascal_context_459,
    open_dataset,
    sample_images,
    voc_sample,
)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 255, (h, w, 3)).astype(np.uint8)


def _raw(values, h: int = 6, w: int = 8) -> np.ndarray:
    raw = np.zeros((h, w), dtype=np.uint8)
    for i, v in enumerate(values):
        raw.flat[i] = v
    return raw


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("name,n", [("cocostuff27", 27), ("cocostuff171", 171), ("ade20k150", 150),
                                    ("cityscapes19", 19), ("cityscapes27", 27),
                                    ("pascal_context59", 59)])
def test_tables_are_well_formed(name, n):
    t = load_table(name)
    assert len(t["class_names"]) == n == len(set(t["class_names"]))
    assert sorted(set(t["mapping"].values())) == list(range(n))
    assert t["ignore_index"] == 255 and t["source"]


def test_table_spot_checks():
    c171 = load_table("cocostuff171")
    assert c171["class_names"][0] == "person" and c171["class_names"][-1] == "wood"
    assert "11" not in c171["mapping"]  # street sign (id 12) is not annotated
    assert c171["mapping"]["12"] == 11 and c171["class_names"][11] == "stop sign"
    c27 = load_table("cocostuff27")
    assert len(c27["mapping"]) == 182
    assert c27["class_names"][c27["mapping"]["0"]] == "person"
    cs = load_table("cityscapes19")
    assert cs["mapping"]["7"] == 0 and cs["mapping"]["26"] == 13 and cs["mapping"]["33"] == 18
    assert "9" not in cs["mapping"]  # parking is ignored in the 19-class benchmark
    assert load_table("ade20k150")["class_names"][:3] == ["wall", "building", "sky"]
    with pytest.raises(ValueError, match="available"):
        load_table("nope")


def test_pascal_context_459_mapping():
    raw = np.array([[0, 2, 9], [458, 1, 460]])
    np.testing.assert_array_equal(map_pascal_context_459(raw), [[0, 1, 2], [59, 0, 0]])


# --------------------------------------------------------------------------- layouts
def test_folder_layout(tmp_path):
    root = tmp_path / "ds"
    (root).mkdir()
    (root / "classes.txt").write_text("sky\n road \ncar\n\n")  # spaces stripped, trailing blank lines ignored
    _write(root / "images" / "a.jpg", _rgb())
    _write(root / "images" / "sub" / "b.png", _rgb(seed=1))
    _write(root / "labels" / "a.png", _raw([0, 1, 2, 255]))
    _write(root / "labels" / "sub" / "b.png", _raw([2, 2]))
    ds = open_dataset("folder", root)
    assert len(ds) == 2 and ds.num_classes == 3 and ds.class_names == ("sky", "road", "car")
    assert ds.image_ids == ["a", "sub__b"]
    image, label, names = ds[0]
    assert Path(image).name == "a.jpg" and names == ds.class_names
    assert label.dtype == np.int32 and label.flat[3] == 255 and label.flat[2] == 2
    s = ds[1]
    assert isinstance(s, Sample) and s.load_image().shape == (6, 8, 3)
    assert [smp.image_id for smp in ds] == ["a", "sub__b"]


def test_folder_layout_custom_ignore_and_errors(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    _write(root / "images" / "x.png", _rgb())
    _write(root / "labels" / "x.png", _raw([0, 1, 7]))
    ds = open_dataset("folder", root, ignore_index=7)
    assert ds.ignore_index == 7 and ds[0].label.flat[2] == 7
    with pytest.raises(ValueError, match="neither"):
        open_dataset("folder", root)[0]  # 7 is no class and not the default ignore (255)
    _write(root / "images" / "y.png", _rgb())
    with pytest.raises(FileNotFoundError, match="without a label"):
        open_dataset("folder", root, ignore_index=7)
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        open_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="unknown layout"):
        open_dataset("voc", root)


@pytest.mark.parametrize("layout", ["cocostuff27", "cocostuff171"])
def test_cocostuff_layout(tmp_path, layout):
    for split in ("val2017", "train2017"):
        _write(tmp_path / "images" / split / "000000000139.jpg", _rgb())
        _write(tmp_path / "images" / split / "000000000285.jpg", _rgb(seed=2))
        # person(0), street sign(11, unused), stop sign(12), sky-other(156), wood(181), unlabeled(255)
        _write(tmp_path / "annotations" / split / "000000000139.png", _raw([0, 11, 12, 156, 181, 255]))
        _write(tmp_path / "annotations" / split / "000000000285.png", _raw([]))
    ds = open_dataset(layout, tmp_path)
    assert ds.split == "val2017" and len(ds) == 2 and ds.image_ids[0] == "000000000139"
    lab = ds[0].label.flat[:6].tolist()
    if layout == "cocostuff27":
        names = ds.class_names
        assert ds.num_classes == 27
        assert [names[v] for v in lab[:5] if v != 255] == ["person", "outdoor", "outdoor", "sky", "solid"]
        assert lab[5] == 255
    else:
        assert ds.num_classes == 171
        assert lab == [0, 255, 11, ds.class_names.index("sky-other"), 170, 255]
    # a curated image list restricts and orders the images
    lst = tmp_path / "list.txt"
    lst.write_text("000000000285\n")
    from emerdiff.evaluation.datasets import cocostuff

    sub = cocostuff(tmp_path, int(layout[9:]), "train2017", image_list=lst)
    assert sub.image_ids == ["000000000285"]


def test_ade20k_layout(tmp_path):
    _write(tmp_path / "images" / "validation" / "ADE_val_00000001.jpg", _rgb())
    _write(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png", _raw([0, 1, 3, 150]))
    ds = open_dataset("ade20k", tmp_path)
    assert ds.num_classes == 150
    assert ds[0].label.flat[:4].tolist() == [255, 0, 2, 149]
    assert ds.class_names[149] == "flag"


@pytest.mark.parametrize("layout", ["cityscapes19", "cityscapes27"])
def test_cityscapes_layout(tmp_path, layout):
    for city in ("frankfurt", "lindau"):
        stem = f"{city}_000000_000294"
        _write(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", _rgb())
        # other gtFine files sit next to the labelIds and must not be picked up as images
        _write(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_color.png", _rgb())
        _write(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png",
               _raw([0, 7, 9, 26, 33, 6]))
    ds = open_dataset(layout, tmp_path)
    assert len(ds) == 2 and ds.image_ids[0] == "frankfurt__frankfurt_000000_000294_leftImg8bit"
    lab = ds[0].label.flat[:6].tolist()
    if layout == "cityscapes19":
        assert lab == [255, 0, 255, 13, 18, 255]
        assert ds.class_names[13] == "car"
    else:
        assert lab == [255, 0, 2, 19, 26, 255]
        assert ds.class_names[2] == "parking" and ds.num_classes == 27


def test_pascal_context_layout(tmp_path):
    for name in ("2008_000002", "2008_000003", "2008_000007"):
        _write(tmp_path / "JPEGImages" / f"{name}.jpg", _rgb())
    for name in ("2008_000002", "2008_000003"):  # 000007 has no Context label
        _write(tmp_path / "SegmentationClassContext" / f"{name}.png", _raw([0, 1, 59, 15]))
    lists = tmp_path / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2008_000003\n")
    (lists / "train.txt").write_text("2008_000002\n2008_000007\n")
    ds = open_dataset("pascal-context59", tmp_path)
    assert ds.image_ids == ["2008_000003"] and ds.num_classes == 59
    assert ds[0].label.flat[:4].tolist() == [255, 0, 58, 14]
    assert ds.class_names[14] == "cat"
    with pytest.raises(FileNotFoundError, match="lack"):
        open_dataset("pascal-context59", tmp_path, split="train")
    assert len(open_dataset("pascal-context59", tmp_path, split="all")) == 2


def test_every_layout_is_registered():
    assert set(LAYOUTS) == {"folder", "cocostuff27", "cocostuff171", "ade20k", "cityscapes19",
                            "cityscapes27", "pascal-context59"}


# --------------------------------------------------------------------------- built-in samples
def test_sample_images_ship_with_skimage():
    imgs = sample_images()
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(imgs)
    for img in imgs.values():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 64


def test_voc_sample_has_ground_truth():
    s = voc_sample()
    image, label, names = s
    assert image.shape[:2] == label.shape and image.dtype == np.uint8
    assert names[0] == "background" and len(names) == 21
    present = set(np.unique(label).tolist()) - {255}
    assert present and max(present) < 21 and len(present) >= 3
    assert s.image_path is None and s.load_image() is image


def test_scene_probe_images_have_ground_truth():
    from emerdiff.assets.scenes import CLASSES

    (item,) = load_probe_images(["scene:3"])
    assert item.name == "scene_3" and item.has_gt and item.num_classes == len(CLASSES)
    assert item.image.shape == (128, 128, 3) and item.label.shape == (128, 128)


def test_scene_probe_images_follow_the_reference_world_unless_named():
    from emerdiff.assets import model_world
    from emerdiff.assets.scenes import heldout_scene_seeds, make_scene

    seed = heldout_scene_seeds(1, start=3)[0]
    default, flat, textured = load_probe_images(["scene:3", "scene:3:flat", "scene:3:textured"])
    assert np.array_equal(flat.image, make_scene(seed, 128, world="flat").image)
    assert np.array_equal(textured.image, make_scene(seed, 128).image)
    assert np.array_equal(default.image, make_scene(seed, 128, world=model_world("reference")).image)
    assert flat.name == "scene_3_flat" and default.name == "scene_3"
