"""Where the readout adds what colour cannot (issue 26): the metrics split by whether a GT boundary pixel is a
colour edge, on hand-made scenes with known answers; in evaluate's results and the held-out table; and the
figure of where each readout wins (rendered, no overlapping text)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_evaluate import _worse_segment, fake_segment, make_folder  # noqa: E402  (same tests folder)
from test_figure_text import text_overlaps  # noqa: E402

from emerdiff.evaluation.colour_edges import (  # noqa: E402
    COLOUR_EDGE_THRESHOLD,
    SplitGeometry,
    choose_threshold,
    colour_edge_split,
    edge_strength,
    split_scores,
    split_table,
)


def camouflage_scene():
    """32 x 32: GT class 0 left of column 16, class 1 right of it. Rows 0-15 are red | green (a colour
    edge), rows 16-31 grey | grey (no colour edge: camouflage)."""
    gt = np.zeros((32, 32), np.int64)
    gt[:, 16:] = 1
    img = np.full((32, 32, 3), 0.5)
    img[:16, :16] = (1.0, 0.0, 0.0)
    img[:16, 16:] = (0.0, 1.0, 0.0)
    return (img * 255).astype(np.uint8), gt


def test_edge_strength_of_flat_and_step_images():
    assert np.all(edge_strength(np.full((8, 8, 3), 90, np.uint8)) == 0)
    step = np.zeros((8, 8, 3))
    step[:, 4:] = 1.0
    s = edge_strength(step)
    assert np.all(s[:, 2:6] == 1.0) and np.all(s[:, :2] == 0) and np.all(s[:, 6:] == 0)


def test_split_of_a_camouflaged_boundary_has_the_known_counts():
    img, gt = camouflage_scene()
    geo = SplitGeometry(img, gt)  # band 1 px, tolerance 1 px at 32 x 32
    assert (geo.band_px, geo.tolerance_px) == (1, 1)
    # the contour is columns 15 and 16; rows 0-16 see the red/green step within their 3 x 3, rows 17-31 do not
    assert np.array_equal(np.flatnonzero(geo.contour.any(axis=0)), [15, 16])
    assert (geo.split[:17, 15:17] == 0).all() and (geo.split[17:, 15:17] == 1).all()
    perfect = split_scores(geo.counts(gt, 2), 2)
    for name in ("boundary_recall", "band_accuracy", "band_miou"):
        assert perfect[name].tolist() == [100.0, 100.0], name
    pred = gt.copy()
    pred[16:, 16:18] = 0  # the boundary 2 px off where colour does not show it
    counts = geo.counts(pred, 2)
    assert counts[0, 1] == 34 and counts[1, 1] == 30  # contour pixels: colour edge / not
    got = split_scores(counts, 2)
    assert got["boundary_recall"].tolist() == [100.0, 0.0]
    assert got["band_accuracy"][0] == pytest.approx(100 * 33 / 34) and got["band_accuracy"][1] == 50.0
    assert got["band_miou"][1] == pytest.approx(25.0)  # class 0: 15 / 30, class 1: 0 / 15


def test_choose_threshold_separates_weak_from_strong_steps():
    rng = np.random.default_rng(0)
    strengths = [np.clip(rng.normal(0.15, 0.04, 500), 0, 1), np.clip(rng.normal(0.85, 0.04, 500), 0, 1)]
    t = choose_threshold(strengths)
    assert 0.3 < t < 0.7
    with pytest.raises(ValueError, match="no GT contour"):
        choose_threshold(np.array([]))


def test_evaluate_results_hold_the_split_with_paired_intervals(tmp_path):
    from emerdiff.evaluation.runner import run_evaluation

    data = make_folder(tmp_path / "data", n=6)
    payload = run_evaluation(data, _worse_segment, None, tmp_path / "o", protocols="concept", n_boot=100)
    split = payload["colour_edge_split"]
    assert split["threshold"] == COLOUR_EDGE_THRESHOLD and split["labelling"] == "majority"
    # the palette's classes differ strongly in colour: every GT boundary is a colour edge
    assert split["pixels"]["colour_edge"]["contour"] > 0 and split["pixels"]["not_colour_edge"]["contour"] == 0
    acc = split["metrics"]["band_accuracy"]["colour_edge"]
    assert acc["nearest"]["value"] == pytest.approx(100.0)  # the fake's nearest map is the GT's blocks
    diff = acc["emerdiff-nearest"]  # its EmerDiff map is shifted 6 px: worse, and the interval says so
    assert diff["hi"] < 0 and diff["lo"] <= diff["value"] <= diff["hi"]
    assert split["metrics"]["band_accuracy"]["not_colour_edge"]["emerdiff"]["value"] is None  # no such pixels
    lines = split_table(split)
    assert any(line.startswith("| band_accuracy | emerdiff - nearest |") for line in lines)


def test_split_pools_images_and_resamples_alike():
    """Two camouflage scenes: the split of both is the sum of their counts; weights 2/0 equal one scene."""
    from types import SimpleNamespace

    img, gt = camouflage_scene()
    pred = gt.copy()
    pred[16:, 16:18] = 0
    mask_ids = pred  # two masks that are the classes themselves
    counts = np.stack([np.bincount(gt[mask_ids == k], minlength=2) for k in range(2)])
    rec = SimpleNamespace(image_id="s", methods=("m",), counts={"m": counts})
    maps = [{"gt": gt, "m": mask_ids}, {"gt": gt, "m": gt}]
    recs = [rec, SimpleNamespace(image_id="t", methods=("m",), counts={"m": np.diag([512, 512])})]
    weights = np.array([[1, 1], [2, 0]])
    out = colour_edge_split(recs, maps, [img, img], 2, weights, methods=["m"])
    rec_not = out["metrics"]["boundary_recall"]["not_colour_edge"]["m"]
    assert rec_not["value"] == pytest.approx(50.0)  # 0 of 30 and 30 of 30
    assert out["pixels"]["not_colour_edge"]["contour"] == 60


def test_heldout_table_adds_the_split_after_every_existing_line():
    from training.heldout import results_table

    rows = [{"protocol": "concept", "method": "emerdiff", "miou": 40.0, "pixel_accuracy": 50.0, "locality": None}]
    ci = {"value": 1.0, "lo": 0.5, "hi": 2.0}
    metric = {"emerdiff": ci, "nearest": ci, "emerdiff-nearest": ci}
    boundary = {"concept": {"boundary_iou": metric, "boundary_f": metric, "trimap_iou_1": metric}}
    split = {"threshold": 0.55, "labelling": "majority", "band_px": 4, "tolerance_px": 2,
             "pixels": {"colour_edge": {"contour": 10, "band": 40}, "not_colour_edge": {"contour": 5, "band": 20}},
             "metrics": {name: {"colour_edge": metric, "not_colour_edge": metric}
                         for name in ("boundary_recall", "band_accuracy", "band_miou")}}
    before = results_table(rows, {"k": 8}, {"concept": metric}, boundary, {"band_px": 4}).splitlines()
    after = results_table(rows, {"k": 8}, {"concept": metric}, boundary, {"band_px": 4}, split).splitlines()
    assert after[:len(before) - 2] == before[:-2] and after[-2:] == before[-2:]
    added = after[len(before) - 2:-2]
    assert any("Colour-edge split" in line for line in added)
    assert "| band_miou | emerdiff - nearest | +1.0 | [+0.5, +2.0] | +1.0 | [+0.5, +2.0] |" in added


def test_readout_wins_figure_renders_without_overlapping_text():
    from emerdiff.viz.images import WIN_COLOURS, readout_wins

    img, gt = camouflage_scene()
    a = gt.copy()
    b = gt.copy()
    b[20:, 14:16] = 1  # B wrong on 24 pixels A gets right
    a[:4, :3] = 1  # A wrong on 12 pixels B gets right
    fig = readout_wins([img, img, img], [gt] * 3, [a] * 3, [b] * 3, "reference",
                       titles=["scene_00100", "scene_00101", "scene_00102"], note="majority labelling")
    assert text_overlaps(fig) == []
    panel = [ax for ax in fig.axes if ax.images][3].images[0].get_array()  # row 2, scene 1
    assert (np.all(np.asarray(panel) == WIN_COLOURS["a"], axis=-1)).sum() == 24
    assert (np.all(np.asarray(panel) == WIN_COLOURS["b"], axis=-1)).sum() == 12
    assert "EmerDiff only: 24 px" in [ax for ax in fig.axes if ax.images][3].get_xlabel()
    plt.close(fig)
    with pytest.raises(ValueError, match="GT's shape"):
        readout_wins([img], [gt], [a[:8]], [b], "m")


def test_fake_segment_runs_are_unaffected_in_their_other_results(tmp_path):
    """The split is added beside the existing results; the mIoU rows are what they were."""
    from emerdiff.evaluation.runner import run_evaluation

    data = make_folder(tmp_path / "data", n=3)
    payload = run_evaluation(data, fake_segment, None, tmp_path / "o", protocols="concept", n_boot=0)
    assert {r["method"] for r in payload["rows"]} == {"emerdiff", "nearest", "bilinear"}
    assert "colour_edge_split" in payload and payload["rows"][0]["miou"] == pytest.approx(100.0)
