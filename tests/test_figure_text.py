"""Every figure function of emerdiff.viz, rendered on small synthetic inputs, passes a reviewer's
text checks (issue 29): no two of its texts (tick labels, axis labels, titles, suptitle, footer)
overlap, no axis is named by a raw column key, and the image grids have no empty bands. Also the
properties the issue asked of single figures: one colour scale per row with a colour bar, failure
rows that differ, titles that claim only what is shown, an overlay that lets the photo show."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from emerdiff import viz  # noqa: E402
from emerdiff.method.vocabulary import OpenVocabResult  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
# the public names of emerdiff.viz that are not figure functions
NOT_FIGURES = {"AXIS_NAMES", "HEATMAP_CMAP", "OVERLAY_ALPHA", "SCALES", "STYLE", "FigureWriter", "_axes_grid",
               "_finish", "_jsonable", "axis_name", "colorize", "declutter_xticks", "highlight_mask", "label_png",
               "mask_outline", "overlay", "palette", "resize_image", "save_figure", "set_style", "show",
               "stamp_model", "to_uint8", "write_sidecar"}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


class FakeSeg:
    """The Segmentation fields the figure functions read."""

    def __init__(self, h=96, w=96, k=4, seed=0):
        rng = np.random.default_rng(seed)
        self.lowres_labels = rng.integers(0, k, (8, 8))
        self.labels = np.kron(rng.integers(0, k, (h // 8, w // 8)), np.ones((8, 8), int))
        self.nearest_labels = self.labels.copy()
        self.bilinear_labels = self.labels.copy()
        self.num_segments = k


def image(h=96, w=96):
    return (RNG.random((h, w, 3)) * 255).astype(np.uint8)


# layers as notebook 01 names them and images as notebooks name them (their ticks overlapped there)
LAYERS = [f"{b}.a{a}.{k}" for b in ("down1", "down2", "mid", "up1", "up2", "up3") for a in (0, 1, 2)
          for k in ("attn1", "attn2")][:32]
IMAGES = ["scene_100", "scene_101", "voc_sample"]


def probe_rows():
    return [dict(layer=f"up_blocks.{i}", short=s, kind="cross" if s.endswith("2") else "self", image=im,
                 miou=float(RNG.random() * 60), boundary=float(1 + RNG.random()), locality=float(RNG.random()))
            for i, s in enumerate(LAYERS) for im in IMAGES]


def sweep_rows():
    return [dict(modulation_strength=lam, modulation_timestep=t, image=im, locality=float(RNG.random()),
                 symmetry=float(RNG.random()), setting_agreement=float(RNG.random()))
            for lam in (1.0, 10.0, 100.0) for t in (81, 281) for im in IMAGES]


def vocab_result(h=96, w=96):
    names = ["sky", "water", "grass", "sand", "brick", "house"]
    class_map = np.kron(RNG.integers(0, len(names), (h // 16, w // 16)), np.ones((16, 16), int))
    return OpenVocabResult(vocabulary=names, class_map=class_map, mask_classes=np.arange(4),
                           mask_scores=RNG.random((4, len(names))), dense_class_map=class_map)


def comparison():
    def interval(v):
        return {"value": v, "lo": v - 2.0, "hi": v + 2.0}

    rows = [{"protocol": p, "method": m, "a": interval(30.0), "b": interval(25.0), "a-b": interval(5.0)}
            for p in ("per_image_hungarian", "dataset_hungarian") for m in ("emerdiff", "nearest", "bilinear")]
    return {"rows": rows, "shared_images": 8, "bootstrap": {"resamples": 100, "level": 0.95}}


def build(name):
    """One rendering of figure function ``name`` on synthetic inputs shaped like the notebooks'."""
    seg, wide = FakeSeg(), FakeSeg(72, 96, seed=1)
    imgs, segs = [image(), image(), image(72, 96)], [seg, FakeSeg(seed=2), wide]
    maps = [[RNG.random((32, 32)) * 10 ** i for _ in range(9)] for i in range(3)]
    entry = dict(image=image(), difference=RNG.random((96, 96)), labels=seg.labels, caption="scene_100: low locality")
    return {
        "segmentation_panels": lambda: viz.segmentation_panels(image(), seg, "reference", gt=seg.labels,
                                                               title="EmerDiff quickstart: scene_100"),
        "teaser_grid": lambda: viz.teaser_grid(imgs, segs, "reference", names=IMAGES),
        "key_observation": lambda: viz.key_observation(image(), seg.lowres_labels == 0, image(), image(),
                                                       RNG.random((96, 96)), "reference", 10.0),
        "upsampling_vs_emerdiff": lambda: viz.upsampling_vs_emerdiff(
            imgs, segs, "reference", gts=[s.labels for s in segs],
            scores=[dict(nearest=15.8, bilinear=16.4, emerdiff=19.7)] * 3, names=IMAGES),
        "heatmap_grid": lambda: viz.heatmap_grid(maps, ["lambda = -10", "lambda = 10", "lambda = 100"],
                                                 [f"up1.a{a}.attn2\nt_m={t}" for a in range(3) for t in (481, 241, 1)],
                                                 "reference", "Difference maps of mask 5: lambda (rows) x layer and "
                                                 "timestep t_m (columns)", cell=1.4),
        "failure_cases": lambda: viz.failure_cases(
            [{**entry, "mask": seg.lowres_labels == i, "mask_id": i} for i in range(3)], "reference"),
        "contact_sheet": lambda: viz.contact_sheet(image(), RNG.random((6, 32, 32)), seg.lowres_labels,
                                                   scores=RNG.random(6), model="reference",
                                                   title="scene_100: difference map of each mask"),
        "legend_figure": lambda: viz.legend_figure(image(), vocab_result(), title="open-vocabulary labels · reference",
                                                   caveat="Caveat: 3 of 4 segments have a best class within noise "
                                                          "of the next; treat those names as guesses " * 2,
                                                   gt=vocab_result().class_map),
        "probe_heatmap": lambda: viz.probe_heatmap(probe_rows()[:18], "short", "image", "locality", "reference",
                                                   "(b) locality of the modulation readout per layer"),
        "probe_bars": lambda: viz.probe_bars(probe_rows(), "short", "miou", "reference",
                                             "(a) k-means on each layer's queries", hue="kind"),
        "sweep_lines": lambda: viz.sweep_lines(sweep_rows(), "modulation_strength",
                                               ["locality", "symmetry", "setting_agreement"], "reference",
                                               "sweep on scene_100: mean over masks vs lambda",
                                               hue="modulation_timestep", reference={"locality": 0.1}, logx=True),
        "comparison_figure": lambda: viz.comparison_figure(comparison(), "reference", names=("k-means", "DiffSeg")),
    }[name]()


FIGURES = ["segmentation_panels", "teaser_grid", "key_observation", "upsampling_vs_emerdiff", "heatmap_grid",
           "failure_cases", "contact_sheet", "legend_figure", "probe_heatmap", "probe_bars", "sweep_lines",
           "comparison_figure"]


def _in_view(axis, value) -> bool:
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
    return lo - tol <= value <= hi + tol


def figure_texts(fig):
    """(kind, Text) of every drawn tick label, axis label and title of every axes (colour bars
    too), the suptitle and the figure's texts (the footer, captions)."""
    fig.canvas.draw()
    out = []
    for ax in fig.axes:
        for axis, kind in ((ax.xaxis, "xtick"), (ax.yaxis, "ytick")):
            for tick in axis.get_major_ticks():
                if tick.label1.get_visible() and tick.label1.get_text() and _in_view(axis, tick.get_loc()):
                    out.append((kind, tick.label1))
        out += [("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label), ("title", ax.title),
                ("title", ax._left_title), ("title", ax._right_title)]
    if fig._suptitle is not None:
        out.append(("suptitle", fig._suptitle))
    out += [("text", t) for t in fig.texts if t is not fig._suptitle]
    return [(k, t) for k, t in out if t.get_visible() and t.get_text().strip()]


def text_overlaps(fig) -> list[str]:
    """Every pair of drawn texts (see :func:`figure_texts`) whose rendered boxes intersect, and every
    title, axis label, suptitle or footer drawn over a panel (tick labels sit beside their own)."""
    texts = figure_texts(fig)
    r = fig.canvas.get_renderer()
    boxes = [(f"{k} {t.get_text()!r}", t.get_window_extent(r)) for k, t in texts]
    out = [f"{a} overlaps {b}" for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:]
           if box.overlaps(other)]
    panels = [(f"panel {i}", ax.get_window_extent(r)) for i, ax in enumerate(fig.axes)]
    return out + [f"{a} lies on {p}" for (kind, _), (a, box) in zip(texts, boxes) if "tick" not in kind
                  for p, panel in panels if box.overlaps(panel)]


def axis_names(fig) -> list[str]:
    """The names a reader sees for the axes: axis labels (colour bars' too) and legend titles."""
    names = [t.get_text() for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label)]
    legends = [leg for ax in fig.axes for leg in [ax.get_legend()] if leg is not None] + list(fig.legends)
    return [n for n in names + [leg.get_title().get_text() for leg in legends] if n.strip()]


# the column keys of the probes' and evaluation's rows: never an axis name by themselves
RAW_KEYS = set(viz.AXIS_NAMES) | {"short", "miou", "score", "lambda", "K", "image", "layer", "value"}


def test_every_figure_function_is_checked():
    public = {n for n in viz.__all__ if callable(getattr(viz, n))}
    assert public - NOT_FIGURES == set(FIGURES)


@pytest.mark.parametrize("name", FIGURES)
def test_figure_text_does_not_overlap(name):
    fig = build(name)
    assert text_overlaps(fig) == []


@pytest.mark.parametrize("name", FIGURES)
def test_no_axis_is_named_by_a_raw_column_key(name):
    fig = build(name)
    raw = [n for n in axis_names(fig) if n.strip() in RAW_KEYS and viz.AXIS_NAMES.get(n.strip(), "") != n.strip()]
    assert raw == []


def test_the_checks_see_what_they_look_for():
    """The overlap check catches crowded ticks and the naming check a raw key: both can fail."""
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(range(3), IMAGES)
    ax.set_ylabel("miou")
    assert any("xtick" in o for o in text_overlaps(fig))
    assert "miou" in axis_names(fig)
    fig = plt.figure(figsize=(2, 2))
    fig.add_axes((0, 0, 1, 1))
    viz.stamp_model(fig, "m")
    assert any("lies on panel" in o for o in text_overlaps(fig))


@pytest.mark.parametrize("name", ["teaser_grid", "upsampling_vs_emerdiff", "heatmap_grid", "segmentation_panels"])
def test_image_grids_have_no_empty_band(name, tmp_path):
    """Saved as the notebooks save (tight box), no band of background is taller than 8 % of the figure
    (fig1 had one above and below its rows of images: the grid was sized for square cells)."""
    from PIL import Image

    fig = build(name)
    path = viz.save_figure(fig, tmp_path, name, formats=("png",))[0]
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    empty = (np.abs(pixels - 255).max(axis=(1, 2)) <= 8)  # rows of (near) white
    runs, run = [], 0
    for e in empty:
        run = run + 1 if e else 0
        runs.append(run)
    assert max(runs) < 0.08 * len(empty), f"{name}: a {max(runs)} px band in {len(empty)} px"


def test_heatmap_grid_has_one_colour_scale_per_row_with_a_bar():
    """Row i's maps are 10**i larger: each row gets its own scale (its panels share it) and a bar,
    so the magnitude of every row can be read."""
    fig = build("heatmap_grid")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    grid = np.array(images).reshape(3, 9)
    for i, row in enumerate(grid):
        limits = {im.get_clim() for im in row}
        assert len(limits) == 1 and limits.pop()[1] >= 10 ** i * 0.9
    colorbars = [ax for ax in fig.axes if not ax.images]
    assert len(colorbars) == 3
    with pytest.raises(ValueError, match="scale must be one of"):
        viz.heatmap_grid([[np.ones((4, 4))]], ["r"], ["c"], "m", "t", scale="panel")


def test_key_observation_title_states_the_share_shown():
    """The title gives the share of the map's energy inside the mask, not a claim that the change
    stays there: half the energy inside a quarter of the image reads 50 % and 25 %."""
    diff = np.zeros((64, 64))
    diff[:32, :32] = 1.0  # the mask: the top-left quarter
    diff[40:, 40:] = np.sqrt(32 * 32 / (24 * 24))  # as much energy outside
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    fig = viz.key_observation(image(64, 64), mask, image(64, 64), image(64, 64), diff, "m", 10.0)
    title = fig._suptitle.get_text()
    assert "only" not in title and "50%" in title and "25%" in title


def test_failure_rows_differ():
    """Each row's third panel is that case's own outcome (the pixels of its mask), not one shared labelling."""
    fig = build("failure_cases")
    third = [ax.images[0].get_array() for ax in fig.axes if ax.images][2::3]
    assert len(third) == 3
    assert all(not np.array_equal(a, b) for i, a in enumerate(third) for b in third[i + 1:])


def test_contact_sheet_scales_each_map_to_its_own_maximum():
    """Maps 1000x apart: each is drawn on its own scale (its brightest pixel at the top of the colour
    map), and the sheet says so."""
    maps = np.stack([RNG.random((16, 16)) * 10.0 ** i for i in range(-2, 2)])
    fig = viz.contact_sheet(image(), maps, np.arange(64).reshape(8, 8) % 4, model="m")
    shown = [ax.images[0] for ax in fig.axes if ax.images][1::2]
    assert [float(np.max(im.get_array())) for im in shown] == pytest.approx([1.0] * 4)
    assert all(im.get_clim() == (0, 1) for im in shown)
    assert "own maximum" in " ".join(t.get_text() for t in fig.texts)


def test_overlay_lets_the_photo_show():
    """At the default alpha a black/white photo under one label keeps most of its contrast."""
    photo = np.zeros((4, 4, 3), np.uint8)
    photo[:, 2:] = 255
    out = viz.overlay(photo, np.zeros((4, 4), int))
    assert out[0, 3].mean() - out[0, 0].mean() >= 0.6


def test_upsampling_figure_names_its_protocol():
    fig = build("upsampling_vs_emerdiff")
    assert "per-image Hungarian" in fig._suptitle.get_text()


def test_legend_figure_shows_the_ground_truth_beside_the_names():
    fig = build("legend_figure")
    assert [ax.get_title() for ax in fig.axes] == ["image", "classes (EmerDiff masks)", "ground truth"]


# ------------------------------------------------------------------ the notebooks' text
PRESET_LINE = {"reference": r"the reference model (\d+) px, (\d+) steps, t_m (\d+), num_clusters (\d+), blur (\d+)",
               "paper": r"Stable Diffusion \(the paper\) (\d+) px, (\d+) steps, t_m (\d+), num_clusters (\d+), "
                        r"blur (\d+)"}


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")), ids=lambda p: p.stem)
def test_notebook_parameter_comments_state_the_presets(path):
    """Each notebook's parameters comment gives each model's preset as emerdiff.config.PRESETS has it
    (they said "both 50 steps and t_m 281" while the reference model's t_m is 81)."""
    from emerdiff.config import PRESETS

    text = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    for kind, pattern in PRESET_LINE.items():
        found = re.search(pattern, text)
        assert found, f"{path.name}: no preset comment for {kind}"
        p = PRESETS[kind]
        expected = [p["resolution"], p["num_inference_steps"], p["modulation_timestep"], p["num_clusters"],
                    p["blur_sigma"]]
        assert [float(g) for g in found.groups()] == expected
    assert "281; both" not in text


def test_open_vocabulary_caveat_cites_no_old_model():
    """The figure's caveat comes from vocabulary_warnings, not from numbers of an older model."""
    text = (ROOT / "notebooks" / "04_paper_figures.py").read_text()
    assert "vocabulary_warnings(" in text and "v1" not in text
