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
    before = snapshot(ins)
    ins.timestep_slider.value = 101
    after = snapshot(ins)
    assert not np.array_equal(before["difference"], after["difference"])
    assert ins.cache_info()["prepare"] == 1 and ins.calls["perturb"] == 2
    ins.layer_dropdown.value = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert not np.array_equal(after["difference"], ins.displayed["difference"])
    assert ins.cache_info()["prepare"] == 1 and ins.calls["perturb"] == 3
    ins.timestep_slider.value = 201  # (t=201, new layer) was never computed -> one new batch
    assert ins.calls["perturb"] == 4
    assert ins.errors == []


def test_lambda_sign_swaps_plus_and_minus(inspector):
    ins = inspector
    before = snapshot(ins)
    ins.lambda_slider.value = -ins.lambda_slider.value
    np.testing.assert_allclose(ins.displayed["plus"], before["minus"], atol=1e-5)
    np.testing.assert_allclose(ins.displayed["minus"], before["plus"], atol=1e-5)
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


def test_fits_1000_px_in_two_rows(inspector):
    ins = inspector
    width, height = ins.fig.get_size_inches() * ins.fig.dpi
    assert width <= 1000 and height <= 700
    rows = {round(ax.get_position().y0, 2) for ax in ins.axes.values()}
    assert len(rows) == 2 and len(ins.axes) == 6
    assert ins.widget.layout.max_width == "1000px"
    assert ins.displayed["unmodulated"].shape == ins.displayed["plus"].shape


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
    assert len(seen) == 1 and f"computing {2 * ins.num_segments} modulated runs" in seen[0]
    assert ins.busy.value == mod.IDLE and "computing" in ins.busy_log[-1]
    ins.segment_select.value = (ins.segment_select.value + 1) % ins.num_segments  # cached: no busy label
    assert len(seen) == 1


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
