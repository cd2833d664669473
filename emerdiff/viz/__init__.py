"""Palettes, overlays and every figure function (one style for every figure).

The figures take arrays and results and compute nothing of the method. Split by kind:
:mod:`emerdiff.viz.core` (palettes, overlays, the house style, axis names, the grid and footer
every figure shares, the writers of figures and sidecars), :mod:`emerdiff.viz.images` (the image
figures: the paper's, the contact sheet, the open-vocabulary legend) and :mod:`emerdiff.viz.plots`
(plots of tables: probes and evaluation). Import any of them from ``emerdiff.viz``.
"""

from __future__ import annotations

from emerdiff.viz.core import (
    AXIS_NAMES,
    HEATMAP_CMAP,
    OVERLAY_ALPHA,
    STYLE,
    FigureWriter,
    _axes_grid,
    _finish,
    _jsonable,
    axis_name,
    colorize,
    declutter_xticks,
    highlight_mask,
    label_png,
    mask_outline,
    overlay,
    palette,
    resize_image,
    save_figure,
    set_style,
    show,
    stamp_model,
    to_uint8,
    write_sidecar,
)
from emerdiff.viz.images import (
    SCALES,
    contact_sheet,
    failure_cases,
    heatmap_grid,
    key_observation,
    legend_figure,
    segmentation_panels,
    teaser_grid,
    upsampling_vs_emerdiff,
)
from emerdiff.viz.plots import comparison_figure, probe_bars, probe_heatmap, sweep_lines

__all__ = [
    "AXIS_NAMES", "HEATMAP_CMAP", "OVERLAY_ALPHA", "SCALES", "STYLE", "FigureWriter", "_axes_grid", "_finish",
    "_jsonable", "axis_name", "colorize", "comparison_figure", "contact_sheet", "declutter_xticks",
    "failure_cases", "heatmap_grid", "highlight_mask", "key_observation", "label_png", "legend_figure",
    "mask_outline", "overlay", "palette", "probe_bars", "probe_heatmap", "resize_image", "save_figure",
    "segmentation_panels", "set_style", "show", "stamp_model", "sweep_lines", "teaser_grid", "to_uint8",
    "upsampling_vs_emerdiff", "write_sidecar",
]
