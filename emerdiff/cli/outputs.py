"""What `segment` and `refine` write for one image: the output-set table, its paths, and the savers.

Split from :mod:`emerdiff.cli.app` (issue 24) so the commands stay readable. Every file of one image
(labels and overlay PNG, ``.npz``; with ``--vocab`` the class map, names and legend; with
``--save-maps`` the maps; refine's ids) is named here, checked before any work
(:func:`output_paths`, :func:`check_targets`) and written as one atomic set (:func:`output_set`).
Heavy imports (PIL, the figures, the labellers) stay inside the functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.files import FileSet, check_output_file

# What one image's output set holds, by option (save_outputs, save_openvocab, --save-maps, refine's ids).
OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png", ".npz")
VOCAB_SUFFIXES = ("_classes.png", "_classes.json", "_legend.png")
MAPS_SUFFIXES = ("_maps.npz", "_maps.png")
IDS_SUFFIX = "_ids.json"


def output_paths(out_dir: Path, stem: str, vocab: bool = False, maps: bool = False, ids: bool = False) -> list[Path]:
    """Every file one image's outputs will take: checked up front, before any work or write."""
    suffixes = [*OUTPUT_SUFFIXES, *(VOCAB_SUFFIXES if vocab else ()), *(MAPS_SUFFIXES if maps else ()),
                *((IDS_SUFFIX,) if ids else ())]
    return [Path(out_dir) / f"{stem}{suffix}" for suffix in suffixes]


def check_targets(targets: list[Path], inputs: list[tuple[str, str]]) -> None:
    """Refuse, before any work, an output path with a folder (or other non-file) in the way, or one that is
    an input of the run (``inputs``: (option or role, path) pairs), which the run would write over."""
    sources = {}
    for role, path in inputs:
        try:
            sources[Path(path).resolve()] = (role, path)
        except OSError:  # an unresolvable input is reported when it is read
            continue
    for target in targets:
        try:
            check_output_file(target)
        except OSError as err:
            raise ValueError(f"cannot write the outputs: {err.strerror}") from None
        hit = sources.get(target.resolve())
        if hit is not None:
            raise ValueError(f"{hit[0]} {hit[1]} is also an output of this run ({target}): it would be written "
                             "over; pass another --out (e.g. a new folder) or move the input first")


def output_set(out_dir: Path, stem: str) -> FileSet:
    """The outputs of one image; ``STEM.npz`` is renamed into place last, so it marks a complete set."""
    return FileSet(out_dir / f"{stem}.npz")


def save_outputs(seg: Any, image: Any, out_dir: Path, stem: str, files: FileSet | None = None) -> list[Path]:
    """Label PNG (indexed palette), overlay PNG and .npz, written atomically as one set.

    With ``files`` the outputs are only staged there (the caller adds more and commits).
    """
    from PIL import Image

    from emerdiff.viz import label_png, overlay

    own = files is None
    files = output_set(out_dir, stem) if files is None else files
    rgb = image.permute(1, 2, 0).numpy()
    labels_png, overlay_png, npz = output_paths(out_dir, stem)
    paths = [files.add(labels_png, lambda p: label_png(seg.labels).save(p, format="PNG"))]
    over = (overlay(rgb, seg.labels) * 255).astype(np.uint8)
    paths.append(files.add(overlay_png, lambda p: Image.fromarray(over).save(p, format="PNG")))

    def write_npz(p: str) -> None:
        import dataclasses

        with open(p, "wb") as f:  # the maps, if any, go to STEM_maps.npz (--save-maps)
            dataclasses.replace(seg, difference_maps=None).save_npz(f)

    paths.append(files.add(npz, write_npz))
    if own:
        files.commit()
    return paths


def save_openvocab(labeller: Any, seg: Any, image: Any, vocabulary: list[str], out_dir: Path, stem: str,
                   model_name: str, files: FileSet | None = None, shown: set[str] | None = None) -> list[Path]:
    """Class map (indexed PNG), class names (JSON) and a legend figure, written atomically.

    With ``files`` they join that image's output set (committed by the caller). The warnings of
    :func:`emerdiff.method.vocabulary.vocabulary_warnings` (names outside what ``model_name`` knows, segments
    whose best class is within noise of the next) go to stderr and into the JSON's ``warnings``; a warning
    already in ``shown`` (the run's earlier images) is not printed again.
    """
    from emerdiff.method.vocabulary import known_vocabulary, vocabulary_warnings
    from emerdiff.viz import label_png

    own = files is None
    files = FileSet(out_dir / f"{stem}_classes.json") if files is None else files
    result = labeller.label(image, seg, vocabulary)
    warnings = vocabulary_warnings(result, known_vocabulary(model_name))
    for warning in warnings:
        if shown is None or warning not in shown:
            print(f"warning: {stem}: {warning}", file=sys.stderr)
        if shown is not None:
            shown.add(warning)
    paths = [files.add(out_dir / f"{stem}_classes.png", lambda p: label_png(result.class_map).save(p, format="PNG"))]
    info = dict(vocabulary=vocabulary, mask_classes=result.mask_classes.tolist(),
                mask_scores=result.mask_scores.round(4).tolist(), labeller=type(labeller).__name__,
                warnings=warnings)
    paths.append(files.add(out_dir / f"{stem}_classes.json", lambda p: Path(p).write_text(json.dumps(info, indent=1))))
    from emerdiff.viz import legend_figure

    fig = legend_figure(image, result, title=f"{type(labeller).__name__} on {model_name}")
    import matplotlib.pyplot as plt

    try:
        paths.append(files.add(out_dir / f"{stem}_legend.png", lambda p: fig.savefig(p, format="png", dpi=100)))
    finally:
        plt.close(fig)
    if own:
        files.commit()
    return paths
