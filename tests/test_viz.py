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
