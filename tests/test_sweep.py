"""emerdiff.studies.sweep: a tidy table of maps and scores over a grid of Step C settings, streamed and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import emerdiff
from emerdiff import EmerDiff
from emerdiff.studies.sweep import RECORDS, load_map

LAYER2 = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def prepared_ed(tiny_model):
    """One EmerDiff and one image inverted up to t = 201 (fast_config's sizes)."""
    from skimage import data

    from emerdiff import EmerDiffConfig

    cfg = EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10, modulation_timestep=201,
                         feature_timestep=1, kmeans_n_init=2, max_batch=9, blur_sigma=1.0)
    ed = EmerDiff(tiny_model, cfg)
    return ed, ed.prepare(data.astronaut(), t_stop=201)


def test_sweep_is_the_package_function():
    from emerdiff.studies.sweep import sweep

    assert emerdiff.sweep is sweep and "sweep" in emerdiff.__all__


def test_one_row_per_setting_and_mask_and_maps_equal_perturb(prepared_ed):
    import pandas as pd

    ed, prepared = prepared_ed
    layers, timesteps, strengths, masks = [ed.config.modulation_layer, LAYER2], [101, 201], [10.0], [0, 2, 3]
    records = emerdiff.sweep(prepared, layers, timesteps, strengths, masks, ed=ed, progress=False)
    assert len(records) == len(layers) * len(timesteps) * len(strengths) * len(masks)
    df = pd.DataFrame(records)
    assert df.groupby(["layer", "modulation_timestep", "modulation_strength"]).size().tolist() == [3, 3, 3, 3]
    assert df["mask"].tolist() == masks * 4  # grid order, masks in the order given
    for col in ("locality", "energy", "symmetry", "agreement", "mask_area", "setting_agreement"):
        assert df[col].notna().all(), col
    assert ((df.locality >= 0) & (df.locality <= 1) & (df.symmetry >= -1) & (df.symmetry <= 1)).all()
    areas = np.bincount(prepared.segments.labels.ravel()) / prepared.segments.labels.size
    np.testing.assert_allclose(df["mask_area"], areas[masks * 4])
    for layer, t in ((layers[0], 101), (layers[1], 201)):  # two of the four settings: each differs
        maps, _ = ed.perturb(prepared, masks, modulation_layer=layer, modulation_timestep=t,
                             modulation_strength=10.0)
        rows = [r for r in records if r["layer"] == layer and r["modulation_timestep"] == t]
        got = np.stack([load_map(r) for r in rows])
        np.testing.assert_allclose(got, maps.numpy(), atol=1e-5, rtol=1e-5)


def test_symmetry_and_agreement_match_the_measures(prepared_ed):
    from emerdiff.method.measures import symmetry, token_agreement
    from emerdiff.studies.probes import perturb_images

    ed, prepared = prepared_ed
    records = emerdiff.sweep(prepared, ed=ed, progress=False)  # the config's one setting, every mask
    pert = perturb_images(ed, prepared)
    np.testing.assert_allclose([r["symmetry"] for r in records], symmetry(pert.plus, pert.minus, pert.unmodulated),
                               atol=1e-6)
    labels = ed.readout(pert.difference("pair"), prepared)  # Step D as segment runs it
    low = prepared.segments.labels
    assert records[0]["setting_agreement"] == pytest.approx(token_agreement(labels, low))
    np.testing.assert_allclose([r["agreement"] for r in records], token_agreement(labels, low, per_mask=True))


def test_sweep_agreement_follows_the_assignment_radius(prepared_ed):
    """The sweep reads out with the config's assign_radius, also over chosen masks: with radius 0 each
    swept mask keeps all its tokens (nearest upsampling); without it the tiny model's maps lose some."""
    ed, prepared = prepared_ed
    masks = [0, 1]
    free = emerdiff.sweep(prepared, masks=masks, ed=ed, progress=False)
    near = emerdiff.sweep(prepared, masks=masks, ed=EmerDiff(ed.model, ed.config.replace(assign_radius=0)),
                          progress=False)
    assert [r["agreement"] for r in near] == [1.0] * len(masks)
    assert min(r["agreement"] for r in free) < 1.0  # else the radius would not be seen


def test_streaming_then_resuming_recomputes_nothing(prepared_ed, tmp_path, monkeypatch):
    import emerdiff.studies.probes as probes

    ed, prepared = prepared_ed
    out = tmp_path / "sweep"
    calls = []
    real = probes.perturb_images

    def counting(*args, **kwargs):
        calls.append((kwargs["modulation_timestep"], kwargs["modulation_strength"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(probes, "perturb_images", counting)
    grid = dict(timesteps=[101, 201], strengths=[10.0], masks=[1, 3])
    first = emerdiff.sweep(prepared, ed=ed, out=out, progress=False, **grid)
    assert len(calls) == 2 and len(first) == 4
    assert len((out / RECORDS).read_text().splitlines()) == 4 and len(list(out.glob("*.npz"))) == 2
    assert "map" not in first[0] and first[0]["map_file"].startswith(str(out))
    maps, _ = ed.perturb(prepared, [1, 3], modulation_timestep=201)
    np.testing.assert_allclose(np.stack([load_map(r) for r in first[2:]]), maps.numpy(), rtol=2e-3, atol=2e-3)
    calls.clear()
    again = emerdiff.sweep(prepared, ed=ed, out=out, progress=False, **grid)
    assert calls == [] and again == first  # nothing recomputed, the same table
    # a bigger grid computes only the new settings
    bigger = emerdiff.sweep(prepared, ed=ed, out=out, progress=False, **dict(grid, strengths=[10.0, 100.0]))
    assert calls == [(101, 100.0), (201, 100.0)] and len(bigger) == 8
    # a run killed while appending: a cut last line, so the last setting has one of its two rows
    lines = (out / RECORDS).read_text().splitlines()
    (out / RECORDS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls.clear()
    assert emerdiff.sweep(prepared, ed=ed, out=out, progress=False, **grid) == first
    assert calls == []  # the cut row belonged to a strength-100 setting, not in this grid
    assert all(json.loads(line) for line in (out / RECORDS).read_text().splitlines())  # the cut line dropped
    bigger_again = emerdiff.sweep(prepared, ed=ed, out=out, progress=False, **dict(grid, strengths=[10.0, 100.0]))
    assert calls == [(201, 100.0)]  # only the setting that lost a row
    assert [r["locality"] for r in bigger_again] == pytest.approx([r["locality"] for r in bigger])


def test_resume_without_preparing_and_refusing_another_image(tiny_model, prepared_ed, tmp_path, monkeypatch):
    from skimage import data

    ed, _ = prepared_ed
    out = tmp_path / "s"
    first = emerdiff.sweep(data.astronaut(), ed=ed, out=out, progress=False)
    assert len(first) == 4

    def no_prepare(*a, **k):
        raise AssertionError("prepared again")

    monkeypatch.setattr(EmerDiff, "prepare", no_prepare)
    assert emerdiff.sweep(data.astronaut(), ed=ed, out=out, progress=False) == first
    with pytest.raises(ValueError, match=r"another image or other settings \(differs in \['image'\]\)"):
        emerdiff.sweep(data.coffee(), strengths=[10.0], ed=ed, out=out, progress=False)
    with pytest.raises(ValueError, match="overrides"):
        emerdiff.sweep(data.astronaut(), strengths=[10.0], ed=ed, out=out, progress=False, readout_steps=1)


def test_readout_steps_needs_no_inversion(prepared_ed, monkeypatch):
    from skimage import data

    import emerdiff.method.pipeline as pipeline

    ed, _ = prepared_ed
    seen = []
    real = EmerDiff.prepare

    def spy(self, *a, **k):
        p = real(self, *a, **k)
        seen.append(p)
        return p

    monkeypatch.setattr(pipeline.EmerDiff, "prepare", spy)
    records = emerdiff.sweep(data.astronaut(), timesteps=[101, 401], ed=ed, progress=False, readout_steps=1)
    assert len(records) == 2 * 4 and {r["readout_steps"] for r in records} == {1}
    assert len(seen) == 1 and seen[0].inversion.noise_maps == {}  # prepared once, no inversion call
    assert "inversion" not in seen[0].counter.calls


def test_bad_requests_fail_before_any_work(prepared_ed):
    ed, prepared = prepared_ed
    with pytest.raises(ValueError, match="are swept"):
        emerdiff.sweep(prepared, ed=ed, modulation_strength=3.0)
    with pytest.raises(ValueError, match="cannot fix"):
        emerdiff.sweep(prepared, ed=ed, num_clusters=3)
    with pytest.raises(ValueError, match="not on the schedule|timestep"):
        emerdiff.sweep(prepared, timesteps=[200], ed=ed)
    with pytest.raises(ValueError, match="was not inverted"):  # prepared up to 201 only
        emerdiff.sweep(prepared, timesteps=[401], ed=ed, progress=False)
    with pytest.raises(ValueError, match="distinct ids"):
        emerdiff.sweep(prepared, masks=[0, 9], ed=ed, progress=False)
    with pytest.raises(ValueError, match="repeated"):
        emerdiff.sweep(prepared, strengths=[1.0, 1], ed=ed)
    with pytest.raises(ValueError, match="needs a model"):
        emerdiff.sweep(prepared)
    with pytest.raises(ValueError, match="modulation_layer|layer"):
        emerdiff.sweep(prepared, layers=["no.such.layer"], ed=ed)


def test_contact_sheet_and_maps_npz(tmp_path):
    from emerdiff.studies.sweep import contact_sheet, save_maps_npz

    low = np.array([[0, 1], [2, 1]])
    maps = torch.rand(3, 32, 32)
    save_maps_npz(tmp_path / "m.npz", maps, [0, 1, 2], low, {"a": 1}, locality=np.ones(3, np.float32))
    with np.load(tmp_path / "m.npz") as z:
        assert z["maps"].dtype == np.float16 and z["maps"].shape == (3, 32, 32)
        assert z["lowres_masks"].shape == (3, 2, 2) and z["lowres_masks"][1].sum() == 2
        assert json.loads(str(z["config"])) == {"a": 1} and z["locality"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="float16"):
        save_maps_npz(tmp_path / "bad.npz", maps * 1e6, [0, 1, 2], low, {})
    import matplotlib.pyplot as plt

    fig = contact_sheet(np.zeros((50, 70, 3), np.uint8), maps, low, scores=[0.1, 0.2, 0.3], model="m")
    titles = [ax.get_title() for ax in fig.axes]
    assert "mask 2" in titles and any(t.startswith("map 1, max") and "locality 0.20" in t for t in titles)
    # the sheet the CLI writes is the viz one: each map on its own scale, not one shared scale
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images and ax.get_title().startswith("map")]
    assert all(float(np.max(a)) == pytest.approx(1.0) for a in images)
    plt.close(fig)


def test_stored_config_leaves_later_fields_out_at_their_default():
    """A sweep folder written before readout_filter / kmeans_backend existed still matches at their defaults."""
    from emerdiff import EmerDiffConfig
    from emerdiff.config import LATER_FIELDS
    from emerdiff.studies.sweep import _stored_config

    assert not set(LATER_FIELDS) & set(_stored_config(EmerDiffConfig()))
    assert _stored_config(EmerDiffConfig(readout_filter="joint_bilateral"))["readout_filter"] == "joint_bilateral"
