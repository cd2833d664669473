"""Per-image records: what the protocols need from one segmented image, and their on-disk cache.

Every image contributes an :class:`ImageRecord`: per method (EmerDiff,
nearest and bilinear upsampling, the image-guided upsamplings (guided filter,
joint bilateral), and any other method a record holds) the
joint histogram ``counts[m, c]`` (pixels of mask m with GT class c, at GT
resolution) of that method's per-pixel mask-id map, plus the masks'
embeddings. EmerDiff and the two upsamplings label pixels with the same K'
low-resolution masks, so they share one embedding array; a method with masks
of its own (e.g. DiffSeg's) carries its own (``ImageRecord.method_embeddings``).
Every protocol (:mod:`emerdiff.evaluation.protocols`) is a function of these
records, so all of them are computed from one cached run without segmenting again.

The cache verifies itself: each record file carries its image id and SHA-256
hashes of the image file, of its label map and of the run settings
(:func:`content_key`, :func:`record_problem`). File names are an injective
encoding of the image id (:func:`safe_id`), so two ids never share a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.evaluation.metrics import confusion_matrix
from emerdiff.files import write_atomic_bytes
from emerdiff.sd.images import resize_labels

METHODS: tuple[str, ...] = ("emerdiff", "nearest", "bilinear", "guided_filter", "joint_bilateral")
# Segmentation attribute holding each method's per-pixel mask-id map.
METHOD_FIELDS: dict[str, str] = {
    "emerdiff": "labels",
    "nearest": "nearest_labels",
    "bilinear": "bilinear_labels",
    "guided_filter": "guided_filter_labels",
    "joint_bilateral": "joint_bilateral_labels",
}
# Methods a segmentation may lack (results and segmenters from before they existed, injected segmenters):
# its record then does not hold them (marked missing) instead of refusing the image.
OPTIONAL_METHODS: tuple[str, ...] = ("guided_filter", "joint_bilateral")
RECORD_VERSION = 2  # 2: image id + image/labels/settings hashes, verified on every run


def mask_class_counts(mask_ids: np.ndarray, gt: np.ndarray, num_masks: int, num_classes: int,
                      ignore_index: int = 255) -> np.ndarray:
    """Joint histogram ``counts[m, c]``: pixels of mask ``m`` with GT class ``c`` (ignore skipped).

    ``mask_ids`` is resized (nearest) to the GT shape when they differ.
    """
    mask_ids = np.asarray(mask_ids)
    if mask_ids.shape != np.shape(gt):
        mask_ids = resize_labels(mask_ids, np.shape(gt))
    return confusion_matrix(mask_ids, gt, num_classes, ignore_index, num_pred=num_masks).T.copy()



@dataclass
class ImageRecord:
    """What the protocols need from one segmented image.

    Attributes:
        image_id: identifier.
        counts: method -> ``(K_m, C)`` joint histogram of the method's mask ids
            (at GT resolution) and GT classes.
        mask_embeddings: ``(K', D)`` embedding of each low-res mask (shared by
            every method without an entry in ``method_embeddings``).
        query_features: ``(h*w, D)`` low-res features (Step A queries).
        lowres_labels: ``(h, w)`` low-res mask ids.
        lowres_gt: ``(h, w)`` GT downsampled to the feature grid (nearest, at
            token centres), ``ignore_index`` where void.
        locality: optional ``(K',)`` share of difference energy inside each mask.
        meta: free-form (segmentation config, model name).
        method_embeddings: method -> ``(K_m, D)`` embeddings of a method whose
            masks are its own (not the K' low-res masks), e.g. DiffSeg's.
    """

    image_id: str
    counts: dict[str, np.ndarray]
    mask_embeddings: np.ndarray
    query_features: np.ndarray
    lowres_labels: np.ndarray
    lowres_gt: np.ndarray
    locality: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    method_embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_masks(self) -> int:
        """Number of shared low-res masks K'."""
        return int(self.mask_embeddings.shape[0])

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this record holds, in stored order."""
        return tuple(self.counts)

    def embeddings(self, method: str) -> np.ndarray:
        """``(K_m, D)`` embeddings of the masks whose ids ``method``'s label map uses."""
        return self.method_embeddings.get(method, self.mask_embeddings)


def segmentation_field(seg: Any, name: str) -> Any:
    """Field `name` of a segmentation object or mapping (None if absent)."""
    return seg.get(name) if isinstance(seg, Mapping) else getattr(seg, name, None)


def extra_method_items(seg: Any, extra_methods: Mapping[str, Mapping[str, Any]] | None = None,
                       ) -> dict[str, Mapping[str, Any]]:
    """Methods of ``seg`` beyond :data:`METHOD_FIELDS`: its ``extra_labels`` (shared mask ids)
    and ``extra_methods`` (or the given ``extra_methods``), name -> ``{"labels", "mask_embeddings"?}``."""
    items: dict[str, Mapping[str, Any]] = {
        name: {"labels": labels} for name, labels in (segmentation_field(seg, "extra_labels") or {}).items()}
    more = segmentation_field(seg, "extra_methods") if extra_methods is None else extra_methods
    for name, item in (more or {}).items():
        if name in items:
            raise ValueError(f"method {name!r} is both in extra_labels and extra_methods; keep one")
        items[name] = item
    return items


def build_record(image_id: str, seg: Any, gt: np.ndarray, num_classes: int,
                 ignore_index: int = 255, methods: Sequence[str] = METHODS,
                 extra_methods: Mapping[str, Mapping[str, Any]] | None = None) -> ImageRecord:
    """An :class:`ImageRecord` from a segmentation (object or mapping) and its GT map.

    ``seg`` needs ``labels``, ``nearest_labels``, ``bilinear_labels`` (mask
    ids, any size: resized to the GT with nearest if different),
    ``lowres_labels``, ``mask_embeddings``, ``query_features`` and optionally
    ``guided_filter_labels``, ``joint_bilateral_labels`` (:data:`OPTIONAL_METHODS`: absent or None,
    the record does not hold that method), ``locality``, ``config``, ``model``.

    Further methods are scored too: ``seg``'s ``extra_labels`` (name -> mask-id
    map in the shared low-res mask ids, as ``Segmentation.extra_labels``) and
    ``extra_methods`` (default: ``seg``'s field of that name) name ->
    ``{"labels": mask ids, "mask_embeddings": (K_m, D) or absent}``. Without ``mask_embeddings`` the
    ids must be the shared low-res masks (e.g. a refinement of them); with it
    they are the method's own masks (e.g. DiffSeg's segments), embedded like
    the shared ones (mean query feature inside each mask, so that every
    protocol, token-mean concepts included, compares like with like).
    """
    gt = np.asarray(gt)
    emb = np.asarray(segmentation_field(seg, "mask_embeddings"), dtype=np.float32)
    feats = np.asarray(segmentation_field(seg, "query_features"), dtype=np.float32)
    low = np.asarray(segmentation_field(seg, "lowres_labels")).astype(np.int64)
    k = emb.shape[0]
    if low.size != feats.shape[0]:
        raise ValueError(f"lowres_labels has {low.size} tokens but query_features {feats.shape[0]}")
    counts = {}
    for m in methods:
        ids = segmentation_field(seg, METHOD_FIELDS[m])
        if ids is None and m in OPTIONAL_METHODS:
            continue
        if ids is None:
            raise ValueError(f"segmentation lacks {METHOD_FIELDS[m]!r} needed for method {m!r}")
        counts[m] = mask_class_counts(ids, gt, k, num_classes, ignore_index)
    own: dict[str, np.ndarray] = {}
    for name, item in extra_method_items(seg, extra_methods).items():
        if name in counts or "-" in name:
            raise ValueError(f"extra method name {name!r} is taken or contains '-' (reserved for differences "
                             "such as 'emerdiff-nearest'); rename it")
        ids = np.asarray(item["labels"])
        if item.get("mask_embeddings") is not None:
            own[name] = np.asarray(item["mask_embeddings"], dtype=np.float32)
        k_m = own[name].shape[0] if name in own else k
        if ids.size and (ids.min() < 0 or ids.max() >= k_m):
            raise ValueError(f"method {name!r}: mask ids {int(ids.min())}..{int(ids.max())} outside 0..{k_m - 1} "
                             f"({'its own' if name in own else 'the shared'} {k_m} masks)")
        counts[name] = mask_class_counts(ids, gt, k_m, num_classes, ignore_index)
    loc = segmentation_field(seg, "locality")
    meta = {}
    for key in ("config", "model"):
        value = segmentation_field(seg, key)
        if value is not None:
            meta[key] = value
    return ImageRecord(
        image_id=image_id,
        counts=counts,
        mask_embeddings=emb,
        query_features=feats,
        lowres_labels=low,
        lowres_gt=resize_labels(gt, low.shape).astype(np.int64),
        locality=None if loc is None else np.asarray(loc, dtype=np.float64),
        meta=meta,
        method_embeddings=own,
    )


def record_methods(records: Iterable[ImageRecord]) -> tuple[str, ...]:
    """The methods of the first record (the protocols check that every record has them)."""
    for rec in records:
        return rec.methods
    raise ValueError("no records to evaluate")


def check_record(rec: ImageRecord, methods: Sequence[str]) -> None:
    """A ValueError naming the fix when ``rec`` lacks one of ``methods`` or its counts and embeddings disagree."""
    missing = [m for m in methods if m not in rec.counts]
    if missing:
        raise ValueError(f"record {rec.image_id!r} lacks method(s) {missing} that other images have "
                         f"(it holds {list(rec.counts)}); re-run evaluate so that every image has the same "
                         "methods, or pass methods= explicitly")
    for m in methods:
        k_m, k_e = rec.counts[m].shape[0], rec.embeddings(m).shape[0]
        if k_m != k_e:
            raise ValueError(f"record {rec.image_id!r}, method {m!r}: counts have {k_m} masks but its "
                             f"embeddings {k_e}")


def resolve_methods(records: Sequence[ImageRecord], methods: Sequence[str] | None) -> tuple[str, ...]:
    """``methods`` as a tuple, or every method the records hold when None."""
    return tuple(methods) if methods is not None else record_methods(records)


# --------------------------------------------------------------------------- per-image cache
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=")
_MAX_NAME = 200  # bytes; file systems allow 255


def safe_id(image_id: str) -> str:
    """File name for an image id: ASCII letters, digits and ``-_.=`` kept, every other byte
    %-escaped (``%`` included, and a leading dot, so no hidden files). The map is injective:
    ``x y`` -> ``x%20y``, ``x_y`` -> ``x_y``. Over-long names end in a hash of the id instead."""
    out = []
    for i, ch in enumerate(image_id):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    name = "".join(out)
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 41]}%{hashlib.sha256(image_id.encode()).hexdigest()[:40]}"
    return name


class RecordError(ValueError):
    """A per-image record cannot be read; the message names the file and the fix."""


def content_key(sample: Any, settings: str) -> dict[str, str]:
    """What a per-image record was computed from: image id and SHA-256 of image, labels, settings."""
    h = hashlib.sha256()
    if isinstance(sample.image, (str, os.PathLike)):
        with open(sample.image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:  # in-memory sample: its pixels, shape and dtype
        arr = np.ascontiguousarray(np.asarray(sample.image))
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    label = np.ascontiguousarray(np.asarray(sample.label))
    lh = hashlib.sha256(f"{label.shape}{label.dtype}".encode())
    lh.update(label.tobytes())
    return {"image_id": sample.image_id, "image_sha256": h.hexdigest(), "labels_sha256": lh.hexdigest(),
            "settings_sha256": settings}


def settings_hash(signature: dict[str, Any]) -> str:
    """SHA-256 of the run settings a record depends on (the dataset's location is not one:
    the image and label hashes pin its contents)."""
    relevant = {k: v for k, v in signature.items() if k != "data"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def stored_key(path: Path) -> dict[str, str]:
    """Read and CRC-check a whole cached .npz; return its stored key fields."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading every member checks every CRC
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise RecordError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    version = int(arrays["version"]) if "version" in arrays else 0
    if version != RECORD_VERSION:
        raise RecordError(f"{path} was written by another emerdiff version (record version {version})")
    return {k: str(arrays[k]) for k in ("image_id", "image_sha256", "labels_sha256", "settings_sha256")
            if k in arrays}


def record_problem(path: Path, key: dict[str, str]) -> str | None:
    """Why the cached file at ``path`` cannot be trusted for ``key`` (None: it can; "missing": none)."""
    if not path.exists():
        return "missing"
    try:
        stored = stored_key(path)
    except RecordError as err:
        return str(err)
    what = {"image_id": "holds the record of another image ({old!r})",
            "image_sha256": "was computed from other image pixels (the image file changed)",
            "labels_sha256": "was computed from other labels (the label file changed)",
            "settings_sha256": "was computed with other settings"}
    for name, message in what.items():
        if stored.get(name) != key[name]:
            return f"{path} {message.format(old=stored.get(name))}"
    return None


def record_path(out: Path, image_id: str) -> Path:
    """Where the per-image record of ``image_id`` lives."""
    return out / "per_image" / f"{safe_id(image_id)}.npz"


def openvocab_path(out: Path, labeller: str, image_id: str) -> Path:
    """Per-image open-vocabulary result: mask classes and the labeller-alone confusion."""
    return out / f"openvocab_{labeller}" / f"{safe_id(image_id)}.npz"


def save_record(path: Path, record: ImageRecord, maps: dict[str, np.ndarray] | None = None,
                key: dict[str, str] | None = None) -> None:
    """Store a record (+ optional full-size label maps and GT for inspection) as one .npz.

    ``key`` (:func:`content_key`) is stored with it so a later run can verify it. A map that is None
    (an :data:`OPTIONAL_METHODS` map the segmentation lacks) is not stored.
    """
    arrays: dict[str, np.ndarray] = {
        **{k: np.array(v) for k, v in (key or {}).items()},
        "version": np.array(RECORD_VERSION),
        "image_id": np.array(record.image_id),
        "mask_embeddings": record.mask_embeddings.astype(np.float32),
        "query_features": record.query_features.astype(np.float32),
        "lowres_labels": record.lowres_labels.astype(np.int32),
        "lowres_gt": record.lowres_gt.astype(np.int32),
        "meta": np.array(json.dumps(record.meta, default=str)),
    }
    for m, c in record.counts.items():
        arrays[f"counts_{m}"] = c.astype(np.int64)
    for m, e in record.method_embeddings.items():  # methods with masks of their own
        arrays[f"embeddings_{m}"] = np.asarray(e, dtype=np.float32)
    if record.locality is not None:
        arrays["locality"] = np.asarray(record.locality, dtype=np.float64)
    for name, value in (maps or {}).items():
        if value is None or (isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0
                             and value.item() is None):
            continue
        # mask ids and class ids are small: int32 keeps any ignore index exact
        arrays[f"map_{name}"] = np.asarray(value).astype(np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic_bytes(path, buf.getvalue())


def load_record(path: Path, image_id: str | None = None) -> ImageRecord:
    """Inverse of :func:`save_record` (label maps are not loaded: the protocols do not need them).

    Raises RecordError naming the file if it is unreadable or (with ``image_id``) another image's.
    """
    try:
        record = _load_record(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise RecordError(f"per-image record {path} is unreadable ({type(err).__name__}: {err}); "
                          "run evaluate again to recompute it") from err
    if image_id is not None and record.image_id != image_id:
        raise RecordError(f"per-image record {path} holds image {record.image_id!r}, not {image_id!r}; "
                          "run evaluate again to recompute it")
    return record


def _load_record(path: Path) -> ImageRecord:
    with np.load(path, allow_pickle=False) as z:
        counts = {k[len("counts_"):]: z[k] for k in z.files if k.startswith("counts_")}
        own = {k[len("embeddings_"):]: z[k] for k in z.files if k.startswith("embeddings_")}
        return ImageRecord(
            image_id=str(z["image_id"]),
            counts=counts,
            mask_embeddings=z["mask_embeddings"],
            query_features=z["query_features"],
            lowres_labels=z["lowres_labels"],
            lowres_gt=z["lowres_gt"],
            locality=z["locality"] if "locality" in z.files else None,
            meta=json.loads(str(z["meta"])),
            method_embeddings=own,
        )


def load_maps(path: Path, image_id: str | None = None) -> dict[str, np.ndarray]:
    """The label maps :func:`save_record` stored with a record: ``{"gt": ..., method: mask ids, ...}``
    (the boundary metrics need them; the region protocols do not)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["image_id"])
            maps = {k[len("map_"):]: z[k] for k in z.files if k.startswith("map_")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise RecordError(f"per-image record {path} is unreadable ({type(err).__name__}: {err}); "
                          "run evaluate again to recompute it") from err
    if image_id is not None and stored != image_id:
        raise RecordError(f"per-image record {path} holds image {stored!r}, not {image_id!r}; "
                          "run evaluate again to recompute it")
    if "gt" not in maps:
        raise RecordError(f"per-image record {path} holds no label maps (map_gt, map_<method>); "
                          "run evaluate again into a fresh --out to store them")
    return maps


class RecordFiles(Sequence[ImageRecord]):
    """Lazy sequence of records on disk: the protocols read it twice without holding it all."""

    def __init__(self, paths: Sequence[Path], image_ids: Sequence[str] | None = None):
        self.paths = list(paths)
        self.image_ids = list(image_ids) if image_ids is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageRecord:  # type: ignore[override]
        return load_record(self.paths[i], self.image_ids[i])

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self.paths)):
            yield self[i]


class MapFiles(RecordFiles):
    """Lazy sequence of the label maps stored with records on disk (:func:`load_maps`)."""

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return load_maps(self.paths[i], self.image_ids[i])
