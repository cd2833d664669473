"""The inspector driven programmatically: widgets set, callbacks fired, displayed arrays checked."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display needed: the figure is drawn off screen

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")

from emerdiff import EmerDiff  # noqa: E402
from emerdiff.notebook.inspector import Inspector  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine is much faster with one torch thread
    yield
    torch.set_num_threads(old)


@pytest.fixture
def inspector(tiny_model, fast_config, photo, one_thread):
    rng = np.random.default_rng(0)
    noise = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    ed = EmerDiff(tiny_model, fast_config)
    return Inspector(ed, {"photo": photo, "noise": noise}, timesteps=[201, 101])


def snapshot(ins):
    return {k: v.copy() for k, v in ins.displayed.items()}


def test_initial_display(inspector, fast_config):
    ins = inspector
    assert ins.errors == []
    r = fast_config.resolution
    assert ins.displayed["image"].shape == (r, r, 3)
    assert ins.displayed["plus"].shape == ins.displayed["minus"].shape == (r, r, 3)
    assert ins.displayed["difference"].shape == ins.displayed["labels"].shape == (r, r)
    assert ins.displayed["difference"].max() > 0
    assert set(np.unique(ins.displayed["labels"])) <= set(range(ins.num_segments))
    assert ins.t_stop == 201  # inverted once up to the slider's largest timestep
    assert list(ins.segment_select.options) == [(f"segment {i}", i) for i in range(ins.num_segments)]


def test_slider_moves_cost_only_modulated_steps(inspector):
    ins = inspector
    k = ins.num_segments
    before = snapshot(ins)
    assert ins.calls["runs"] == 2 * k  # the first display: every pair, one batch
    ins.timestep_slider.value = 101
    after = snapshot(ins)
    assert not np.array_equal(before["difference"], after["difference"])
    # a t_m move runs the chosen segment's pair only, on the cached preparation
    assert ins.cache_info()["prepare"] == 1 and ins.calls["perturb"] == 2 and ins.calls["runs"] == 2 * k + 2
    ins.layer_dropdown.value = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert not np.array_equal(after["difference"], ins.displayed["difference"])
    assert ins.cache_info()["prepare"] == 1 and ins.calls["perturb"] == 3
    ins.timestep_slider.value = 201  # (t=201, new layer) was never computed -> one new batch
    assert ins.calls["perturb"] == 4 and ins.calls["runs"] == 2 * k + 6
    assert ins.errors == []


def test_lambda_sign_swaps_plus_and_minus(inspector):
    ins = inspector
    before = snapshot(ins)
    ins.lambda_slider.value = -ins.lambda_slider.value
    # before: a batch of 2K + 1 runs; after: 3 (the chosen pair), so float sums differ in the last bits
    np.testing.assert_allclose(ins.displayed["plus"], before["minus"], atol=1e-4)
    np.testing.assert_allclose(ins.displayed["minus"], before["plus"], atol=1e-4)
    # ||I- - I+|| is symmetric in the sign, so the labels do not move
    np.testing.assert_allclose(ins.displayed["difference"], before["difference"], atol=1e-4)
    ins.lambda_slider.value = 0.0
    assert float(np.abs(ins.displayed["difference"]).max()) < 1e-3


def test_segment_choice_is_free_and_clicking_selects(inspector):
    ins = inspector
    calls = dict(ins.calls)
    before = snapshot(ins)
    other = (ins.segment_select.value + 1) % ins.num_segments
    ins.segment_select.value = other
    assert ins.calls == calls  # cached: choosing a segment runs no UNet
    assert not np.array_equal(before["image"], ins.displayed["image"])
    assert not np.array_equal(before["difference"], ins.displayed["difference"])
    np.testing.assert_array_equal(before["labels"], ins.displayed["labels"])
    # a click in the image picks the segment under the cursor (token grid of the query layer)
    seg = ins.prepared.segments.labels
    r = ins.ed.config.resolution
    cell = r / seg.shape[0]
    for (row, col) in [(0, 0), (seg.shape[0] - 1, seg.shape[1] - 1)]:
        x, y = (col + 0.5) * cell, (row + 0.5) * cell
        assert ins.select_at(x, y) == seg[row, col] == ins.segment_select.value

    class Event:  # what matplotlib hands to the button_press_event callback
        inaxes = ins.axes["image"]
        xdata, ydata = 0.5 * cell, 0.5 * cell

    ins.segment_select.value = (int(seg[0, 0]) + 1) % ins.num_segments
    ins._on_click(Event())
    assert ins.segment_select.value == seg[0, 0]


def test_image_switch_prepares_once_per_image(inspector):
    ins = inspector
    first = snapshot(ins)
    ins.image_dropdown.value = "noise"
    assert ins.cache_info()["prepared"] == ["photo", "noise"]
    assert not np.array_equal(first["image"], ins.displayed["image"])
    ins.image_dropdown.value = "photo"
    assert ins.cache_info()["prepare"] == 2  # back to the first image: cached
    np.testing.assert_array_equal(first["image"], ins.displayed["image"])


def test_callback_errors_are_shown_not_lost(inspector, monkeypatch):
    ins = inspector

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the UNet")

    monkeypatch.setattr("emerdiff.notebook.inspector.perturb_images", broken)
    ins.lambda_slider.value = 3.0  # uncached setting -> perturbation -> error
    assert ins.errors and "boom in the UNet" in ins.errors[-1]
    assert any("boom in the UNet" in o.get("text", "") for o in ins.log.outputs)
    assert "error" in ins.status.value


def test_bad_timesteps_fail_early(tiny_model, fast_config):
    with pytest.raises(ValueError, match="not on the schedule"):
        Inspector(EmerDiff(tiny_model, fast_config), {"x": np.zeros((64, 64, 3), np.uint8)}, timesteps=[250])


def test_controls_beside_a_figure_that_fits(inspector):
    """Controls in a column beside the figure, both inside 1000 x 560 px: a 1400x900 window shows them together."""
    from emerdiff.notebook.inspector import CONTROLS_WIDTH

    ins = inspector
    width, height = ins.fig.get_size_inches() * ins.fig.dpi
    assert width + int(CONTROLS_WIDTH.removesuffix("px")) <= 1000 and height <= 560
    row = ins.widget.children[0]
    controls, view = row.children
    assert type(row).__name__ == "HBox" and view is ins.view
    for w in (ins.lambda_slider, ins.timestep_slider, ins.layer_dropdown, ins.segment_select, ins.busy):
        assert w in controls.children
    # two rows of three square, non-overlapping panels
    ins.fig.canvas.draw()
    boxes = [ax.get_window_extent() for ax in ins.axes.values()]
    assert len({round(b.y0) for b in boxes}) == 2 and len(boxes) == 6
    assert all(abs(b.width - b.height) < 1 for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert ins.displayed["unmodulated"].shape == ins.displayed["plus"].shape


def test_one_colour_per_segment_in_every_panel(inspector):
    """The segment panel and the labels panel paint segment i in the same colour (palette(K)[i])."""
    from emerdiff.sd.images import resize_labels
    from emerdiff.viz import mask_outline

    ins = inspector
    for _ in range(2):  # and after another segment is chosen
        res = ins.ed.config.resolution
        lowres = resize_labels(ins.prepared.segments.labels, (res, res))
        outline = mask_outline(lowres == ins.segment_select.value)
        outline[1:] |= outline[:-1]
        outline[:, 1:] |= outline[:, :-1]
        seg_panel = ins._artists["image"].get_array()
        label_panel = np.asarray(ins._artists["labels"].get_array())
        labels = ins.displayed["labels"]
        for s in np.unique(labels):
            seen = np.unique(np.asarray(seg_panel)[(lowres == s) & ~outline], axis=0)
            painted = np.unique(label_panel[labels == s], axis=0)
            assert len(seen) == 1 and len(painted) == 1 and np.array_equal(seen, painted), s
        ins.segment_select.value = (ins.segment_select.value + 1) % ins.num_segments


def test_toolbar_header_and_footer_off_in_ipympl(tiny_model, fast_config, photo, one_thread):
    """In JupyterLab's widget backend the canvas shows the figure only: no toolbar over the segment panel."""
    import matplotlib.pyplot as plt

    pytest.importorskip("ipympl")
    plt.switch_backend("module://ipympl.backend_nbagg")
    try:
        ins = Inspector(EmerDiff(tiny_model, fast_config), {"photo": photo}, timesteps=[201])
        canvas = ins.fig.canvas
        assert ins.view is canvas and canvas in ins.widget.children[0].children
        assert canvas.toolbar_visible is False and not canvas.header_visible and not canvas.footer_visible
        assert ins.errors == []
        plt.close(ins.fig)
    finally:
        plt.switch_backend("Agg")  # this module's backend (get_backend() may name ipympl's by now)


def test_lambda_change_runs_only_the_chosen_pair(tiny_model, fast_config, photo, one_thread):
    """A lambda move runs 2 of the 2K runs; the labels panel says it is stale until the rest exist, then
    shows what a full recompute at that lambda gives."""
    ed = EmerDiff(tiny_model, fast_config)
    ins = Inspector(ed, {"photo": photo}, timesteps=[201])
    k = ins.num_segments
    start_labels = ins.displayed["labels"].copy()
    assert ins.labels_current and ins.calls["runs"] == 2 * k
    ins.segment_select.value = sid = 1
    ins.lambda_slider.value = 4.0
    assert ins.calls["runs"] == 2 * k + 2 and ins.missing() == [i for i in range(k) if i != sid]
    assert not ins.labels_current
    np.testing.assert_array_equal(ins.displayed["labels"], start_labels)  # the older labels, kept ...
    title = ins.axes["labels"].get_title()
    assert "STALE" in title and "lambda 10" in title and f"1/{k}" in title  # ... and said to be older
    assert "stale" in ins.status.value
    full = Inspector(ed, {"photo": photo}, timesteps=[201], lazy_labels=False)
    full.lambda_slider.value = 4.0
    assert full.calls["runs"] == 4 * k and full.labels_current  # the full recompute: every pair again
    # the chosen segment's map equals the full batch's (up to float sums over another batch shape)
    np.testing.assert_allclose(ins.displayed["difference"], full.result()[0].difference("pair")[sid].numpy(),
                               atol=1e-4)
    assert ins.complete_labels()
    assert ins.labels_current and ins.missing() == [] and ins.calls["runs"] == 4 * k
    assert "STALE" not in ins.axes["labels"].get_title() and "labels: current" in ins.status.value
    assert (ins.displayed["labels"] == full.displayed["labels"]).mean() > 0.999
    assert not ins.complete_labels()  # nothing left to run


def test_deferred_labels_follow_and_are_superseded(tiny_model, fast_config, photo, one_thread):
    """With a scheduler the rest follows in chunks after the callback; a newer setting drops the older work."""
    import emerdiff.notebook.inspector as mod

    queue = []
    ins = Inspector(EmerDiff(tiny_model, fast_config), {"photo": photo}, timesteps=[201], defer=queue.append)
    k = ins.num_segments
    assert queue == []  # the first display is complete
    ins.lambda_slider.value = 3.0
    ins.lambda_slider.value = 5.0  # moved on before the deferred batch of lambda 3 ran
    runs = ins.calls["runs"]
    assert len(queue) == 2
    queue.pop(0)()  # lambda 3's batch: superseded, runs nothing
    assert ins.calls["runs"] == runs
    batches = 0
    while queue:
        queue.pop(0)()
        batches += 1
    assert ins.labels_current and ins.missing() == [] and ins.calls["runs"] == runs + 2 * (k - 1)
    assert batches == -(-(k - 1) // mod.LAZY_CHUNK)
    assert "STALE" not in ins.axes["labels"].get_title()


def test_busy_label_during_recompute(inspector, monkeypatch):
    import emerdiff.notebook.inspector as mod

    ins = inspector
    seen = []
    real = mod.perturb_images

    def spy(*args, **kwargs):
        seen.append(ins.busy.value)  # what the browser shows while the UNet runs
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "perturb_images", spy)
    ins.lambda_slider.value = 7.0
    assert len(seen) == 1 and f"computing 2 runs (segment {ins.segment_select.value})" in seen[0]
    assert ins.busy.value == mod.IDLE and "computing" in ins.busy_log[-1]
    ins.complete_labels()  # the other segments' pairs, one batch
    assert len(seen) == 2 and f"computing {2 * ins.num_segments - 2} runs" in seen[1]
    ins.segment_select.value = (ins.segment_select.value + 1) % ins.num_segments  # cached: no busy label
    assert len(seen) == 2


def test_lambda_zero_is_explained_in_place(inspector):
    ins = inspector
    ins.lambda_slider.value = 0.0
    titles = {k: ax.get_title() for k, ax in ins.axes.items()}
    assert "lambda = 0" in titles["difference"] and "undefined" in titles["labels"]
    assert "perturbs nothing" in ins.status.value
    assert not any("-0)" in t for t in titles.values())
    ins.lambda_slider.value = 10.0
    assert ins.axes["plus"].get_title() == "I+ (c = +10)" and ins.axes["minus"].get_title() == "I- (c = -10)"
    assert "perturbs nothing" not in ins.status.value


def test_inspector_with_readout_steps(tiny_model, fast_config, photo, one_thread):
    """The reduced readout runs no inversion; the inspector must still move t_m freely."""
    ed = EmerDiff(tiny_model, fast_config.replace(readout_steps=2))
    ins = Inspector(ed, {"photo": photo}, timesteps=[401, 201])
    first = snapshot(ins)
    ins.timestep_slider.value = 401
    moved = snapshot(ins)
    assert ins.prepared.inversion.noise_maps == {}  # nothing was inverted
    assert any(not np.array_equal(first[k], moved[k]) for k in first)


def test_inspector_follows_the_assignment_radius(tiny_model, fast_config, photo, one_thread):
    """The live labels use the config's assign_radius as segment does: radius 0 is nearest upsampling."""
    from emerdiff.method.readout import nearest_upsample

    ins = Inspector(EmerDiff(tiny_model, fast_config.replace(assign_radius=0)), {"photo": photo}, timesteps=[201])
    _, labels = ins.result()
    assert np.array_equal(labels, nearest_upsample(ins.prepared.segments.labels, labels.shape))
