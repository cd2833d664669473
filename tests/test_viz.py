"""viz: palette/overlay behaviour, figure functions stamp the model, outputs are written."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from emerdiff import viz  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


class FakeSeg:
    """The Segmentation fields the figure functions read."""

    def __init__(self, h=40, w=60, k=3):
        rng = np.random.default_rng(0)
        self.lowres_labels = rng.integers(0, k, (4, 4))
        self.labels = rng.integers(0, k, (h, w))
        self.nearest_labels = self.labels.copy()
        self.bilinear_labels = self.labels.copy()
        self.num_segments = k


def texts(fig):
    return " ".join(t.get_text() for t in fig.texts) + " " + (fig._suptitle.get_text() if fig._suptitle else "")


def test_existing_helpers_unchanged():
    assert viz.palette(3).tolist() == [[230, 25, 75], [60, 180, 75], [255, 225, 25]]
    assert viz.palette(300).shape == (300, 3)
    labels = np.array([[0, 1], [2, 1]])
    assert viz.colorize(labels).shape == (2, 2, 3)
    ov = viz.overlay(np.zeros((2, 2, 3), np.uint8), labels, alpha=1.0)
    np.testing.assert_allclose(ov, viz.colorize(labels) / 255.0)
    assert viz.label_png(labels).mode == "P"


def test_to_uint8_and_highlight():
    chw = np.ones((3, 8, 8), np.float32) * 0.5
    assert viz.to_uint8(chw).shape == (8, 8, 3) and viz.to_uint8(chw).dtype == np.uint8
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    out = viz.highlight_mask(np.full((8, 8, 3), 200, np.uint8), mask)
    assert out[6, 6].max() < 200  # outside the mask dimmed
    assert (out == [255, 255, 0]).all(-1).any()  # outlined


def test_figures_state_the_model():
    img = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    seg = FakeSeg()
    figs = [
        viz.segmentation_panels(img, seg, "my-model", gt=np.zeros((40, 60), int)),
        viz.teaser_grid([img, img], [seg, seg], "my-model", names=["a", "b"]),
        viz.key_observation(img, seg.lowres_labels == 0, img, img, np.random.rand(40, 60), "my-model", 10.0),
        viz.upsampling_vs_emerdiff([img], [seg], "my-model", gts=[None], scores=[{"emerdiff": 12.0}]),
        viz.heatmap_grid([[np.random.rand(8, 8)] * 2] * 2, ["r1", "r2"], ["c1", "c2"], "my-model", "grid"),
        viz.failure_cases([dict(image=img, mask=seg.lowres_labels == 1, difference=np.random.rand(40, 60),
                                labels=seg.labels, caption="low locality")], "my-model"),
    ]
    rows = [dict(layer=l, image=i, score=s, kind="self") for l, i, s in [("a", "x", 1.0), ("b", "x", 2.0), ("a", "y", 3.0)]]
    figs += [viz.probe_heatmap(rows, "layer", "image", "score", "my-model", "t"),
             viz.probe_bars(rows, "layer", "score", "my-model", "t", hue="kind"),
             viz.sweep_lines(rows, "layer", ["score"], "my-model", "t")]
    for fig in figs:
        assert "model: my-model" in texts(fig)


def test_writer_saves_png_pdf_and_strict_json(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    w = viz.FigureWriter(tmp_path / "out", "m")
    paths = w.save(fig, "fig1_teaser")
    assert [p.name for p in paths] == ["fig1_teaser.png", "fig1_teaser.pdf"]
    side = w.sidecar("00_x", {"a": float("nan"), "b": np.float32(1.5), "c": np.arange(2)})
    data = json.loads(side.read_text())
    assert data == {"model": "m", "figures": ["fig1_teaser"], "a": None, "b": 1.5, "c": [0, 1]}


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs (text, text-or-axes) whose drawn boxes intersect: titles, labels, suptitle, footers vs each
    other and vs every image panel."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    candidates = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    candidates += list(fig.texts) + ([fig._suptitle] if fig._suptitle is not None else [])
    texts = [t for t in dict.fromkeys(candidates) if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in texts]
    panels = [(f"axes {i}", ax.get_window_extent(r)) for i, ax in enumerate(fig.axes)]
    bad = []
    for i, (name, box) in enumerate(boxes):
        bad += [(name, other) for other, b in boxes[i + 1:] if box.overlaps(b)]
        bad += [(name, other) for other, b in panels if box.overlaps(b)]
    return bad


def test_grid_figures_have_no_overlapping_text():
    """fig4 (per-row scores, several rows) and the wide layer x (timestep, lambda) grid: no title, label
    or footer sits on an image or on another text (tight_layout let row titles cover the row above)."""
    segs = [FakeSeg(), FakeSeg(), FakeSeg(30, 60)]
    imgs = [np.zeros((s.labels.shape[0], s.labels.shape[1], 3), np.uint8) for s in segs]
    scores = [dict(nearest=15.8, bilinear=16.4, emerdiff=19.7)] * 3
    fig = viz.upsampling_vs_emerdiff(imgs, segs, "reference", gts=[s.labels for s in segs], scores=scores,
                                     names=["scene_0", "scene_1", "voc_sample"])
    assert text_overlaps(fig) == []
    assert sum(ax.get_xlabel().startswith("mIoU") for ax in fig.axes) == 9
    maps = [[np.random.default_rng(j).random((32, 32)) for j in range(9)] for _ in range(3)]
    cols = [f"t={t}\nlambda={s}" for t in (281, 141, 21) for s in (-10, 10, 100)]
    fig = viz.heatmap_grid(maps, ["up1.a0.attn2", "up1.a1.attn2", "up1.a2.attn2"], cols, "reference",
                           "Difference maps of mask 3: layer (rows) x timestep x lambda (columns)", cell=1.4)
    assert text_overlaps(fig) == []
    width, height = fig.get_size_inches() * 120  # savefig dpi of the house style
    assert height < 700 < width


def test_overlap_check_sees_overlaps():
    fig, ax = plt.subplots(2, 1, figsize=(2, 2))
    ax[1].set_title("a long title that runs into the panel above it\n\n\n")
    assert text_overlaps(fig)


def _interval(value, half):
    return {"value": value, "lo": value - half, "hi": value + half}


def synthetic_comparison(protocols=("per_image_hungarian", "dataset_hungarian")):
    """compare_runs' shape: emerdiff and nearest in both runs, diffseg in B only; one difference
    without an interval (NaN bounds, as with --bootstrap 0) and one as JSON writes it (None)."""
    rows = []
    for j, p in enumerate(protocols):
        a_e, b_e, a_n, b_n, b_d = 40.0 + j, 30.0 + j, 20.0 + j, 22.0 + j, 35.0 + j
        rows += [
            {"protocol": p, "method": "emerdiff", "a": _interval(a_e, 3.0 + j), "b": _interval(b_e, 2.0),
             "a-b": _interval(a_e - b_e, 4.0)},
            {"protocol": p, "method": "nearest", "a": _interval(a_n, 1.5), "b": _interval(b_n, 2.5 + j),
             "a-b": {"value": a_n - b_n, "lo": float("nan"), "hi": float("nan")} if j == 0
             else {"value": a_n - b_n, "lo": None, "hi": None}},
            {"protocol": p, "method": "diffseg", "a": None, "b": _interval(b_d, 5.0), "a-b": None},
        ]
    return {"rows": rows, "shared_images": 8, "only_a": [], "only_b": [],
            "bootstrap": {"resamples": 100, "seed": 0, "level": 0.95, "paired": True}}


def _tick_method(ax, y):
    """The y tick label nearest to y (the method a bar or dot belongs to); ``ax``: the row's first
    panel (the row shares its y axis, and only the first panel shows the labels)."""
    ticks = ax.get_yticks()
    return ax.get_yticklabels()[int(np.argmin(np.abs(ticks - y)))].get_text()


@pytest.mark.parametrize("protocols", [("per_image_hungarian", "dataset_hungarian"),
                                       ("per_image_hungarian", "dataset_hungarian", "concept")])
def test_comparison_figure_draws_every_value_with_its_interval(protocols):
    from matplotlib.colors import to_rgba
    from matplotlib.container import BarContainer, ErrorbarContainer

    comparison = synthetic_comparison(protocols)
    fig = viz.comparison_figure(comparison, "my-model", names=("k-means", "DiffSeg"), note="scenes 100-107")
    assert "model: my-model" in texts(fig) and "k-means" in texts(fig) and "8 shared images" in texts(fig)
    assert text_overlaps(fig) == []
    axes = np.array(fig.axes).reshape(2, len(protocols))
    side_of = {to_rgba("tab:blue"): "a", to_rgba("tab:orange"): "b"}
    for j, protocol in enumerate(protocols):
        top, bottom = axes[:, j]
        assert top.get_title() == protocol.replace("_", " ")
        expected = {(r["method"], side): r[side] for r in comparison["rows"] if r["protocol"] == protocol
                    for side in ("a", "b") if r[side] is not None}
        drawn = {}
        for c in (c for c in top.containers if isinstance(c, BarContainer)):  # (+ their error bars)
            assert len(c.patches) == 1
            bar = c.patches[0]
            key = (_tick_method(axes[0, 0], bar.get_y() + bar.get_height() / 2), side_of[bar.get_facecolor()])
            assert key not in drawn
            (lo, _), (hi, _) = c.errorbar.lines[2][0].get_segments()[0]
            drawn[key] = {"value": bar.get_width(), "lo": lo, "hi": hi}
        assert drawn.keys() == expected.keys()  # one bar per method and run; none for diffseg in A
        for key, v in expected.items():
            assert drawn[key] == pytest.approx(v), key
        assert top.yaxis_inverted() and bottom.yaxis_inverted()  # the first method on top
        # bottom row: A - B where both runs have the method; an error bar only where there is an interval
        dots = [c for c in bottom.containers if isinstance(c, ErrorbarContainer)]
        differences = {r["method"]: r["a-b"] for r in comparison["rows"]
                       if r["protocol"] == protocol and r["a-b"] is not None}
        assert len(dots) == len(differences)
        for c in dots:
            line = c.lines[0]
            x, y = float(line.get_xdata()[0]), float(line.get_ydata()[0])
            d = differences[_tick_method(axes[1, 0], y)]
            assert x == pytest.approx(d["value"])
            if d["lo"] is None or not np.isfinite(d["lo"]):
                assert not c.lines[2]
            else:
                (lo, _), (hi, _) = c.lines[2][0].get_segments()[0]
                assert (lo, hi) == pytest.approx((d["lo"], d["hi"]))
    labels = fig.legends[0].get_texts()
    assert [t.get_text() for t in labels] == ["A: k-means", "B: DiffSeg"]


def test_comparison_figure_refuses_missing_protocols():
    with pytest.raises(ValueError, match=r"no rows for protocol\(s\) \['concept'\]"):
        viz.comparison_figure(synthetic_comparison(), "m", protocols=["concept"])
    with pytest.raises(ValueError, match="two names"):
        viz.comparison_figure(synthetic_comparison(), "m", names=("only one",))
