"""Probe functions on the tiny model: row shapes, score ranges, degenerate cases, consistency with the pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from emerdiff import EmerDiff
from emerdiff.evaluation.datasets import load_probe_images
from emerdiff.sd.loading import layer_table
from emerdiff.studies import probes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than 2 on the busy shared CPU
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def items():
    voc, astro = load_probe_images(["voc_sample", "astronaut"])
    return voc, astro


@pytest.fixture
def ed(tiny_model, fast_config):
    return EmerDiff(tiny_model, fast_config)


# ------------------------------------------------------------------ helpers
def test_short_layer_names():
    assert probes.short_layer("up_blocks.1.attentions.2.transformer_blocks.0.attn2") == "up1.a2.attn2"
    assert probes.short_layer("mid_block.attentions.0.transformer_blocks.0.attn1") == "mid.a0.attn1"


# ------------------------------------------------------------------ probes
def test_layer_probe_one_row_per_attention_layer(ed, items):
    voc, astro = items
    rows = probes.layer_probe(ed, [voc, astro])
    layers = [r["layer"] for r in layer_table(ed.model.unet)]
    assert [r["layer"] for r in rows] == layers * 2
    with_gt, without = rows[: len(layers)], rows[len(layers):]
    assert all(r["score_name"] == "miou" and 0 <= r["miou"] <= 100 for r in with_gt)
    assert all(r["score_name"] == "boundary" and math.isnan(r["miou"]) for r in without)
    assert all(math.isfinite(r["boundary"]) and -1 <= r["silhouette"] <= 1 for r in rows)
    assert all(r["clusters"] <= min(ed.config.num_clusters, r["tokens"]) for r in rows)
    with pytest.raises(ValueError, match="unknown layers"):
        probes.layer_probe(ed, [voc], layers=["nope"])


def test_modulation_layer_probe_locality_in_unit_interval(ed, items):
    layers = ["up_blocks.1.attentions.2.transformer_blocks.0.attn2", "down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    rows = probes.modulation_layer_probe(ed, items[:1], layers=layers)
    assert [r["layer"] for r in rows] == layers
    for r in rows:
        assert 0 <= r["locality_min"] <= r["locality"] <= 1
        assert 0 <= r["miou"] <= 100 and not r["degenerate"] and r["energy"] > 0


def test_lambda_zero_is_degenerate_without_nan(ed, items):
    rows = probes.lambda_sweep(ed, items[:1], strengths=(0.0, -5.0, 5.0))
    by = {(r["lambda"], r["mode"]): r for r in rows}
    assert set(by) == {(0.0, "one-sided"), (0.0, "pair"), (-5.0, "one-sided"), (5.0, "one-sided"), (5.0, "pair")}
    for key in [(0.0, "one-sided"), (0.0, "pair")]:
        r = by[key]
        assert r["degenerate"] and r["locality"] == 0.0 and r["locality_min"] == 0.0
        assert all(not (isinstance(v, float) and math.isnan(v)) for k, v in r.items() if k not in ("boundary",))
    for key in [(-5.0, "one-sided"), (5.0, "one-sided"), (5.0, "pair")]:
        assert 0 < by[key]["locality"] <= 1 and by[key]["energy"] > 0 and 0 <= by[key]["saturated"] <= 1


def test_perturb_images_pair_matches_pipeline(ed, items):
    prepared = ed.prepare(items[0].image)
    maps, _ = ed.perturb(prepared)
    pert = probes.perturb_images(ed, prepared)
    torch.testing.assert_close(pert.difference("pair"), maps.float().cpu(), atol=2e-3, rtol=1e-3)
    assert pert.plus.shape == pert.minus.shape == (prepared.segments.num_segments, 3, 128, 128)
    # the reference of the batch is the unmodulated reconstruction
    torch.testing.assert_close(pert.unmodulated.clamp(0, 1), ed.reconstruct(prepared).cpu(), atol=2e-3, rtol=1e-3)


def test_timestep_sweeps(ed, items):
    voc = items[0]
    f = probes.feature_timestep_sweep(ed, [voc], timesteps=[901, 1])
    assert [r["feature_timestep"] for r in f] == [901, 1] and all(0 <= r["miou"] <= 100 for r in f)
    m = probes.modulation_timestep_sweep(ed, [voc], timesteps=[201, 101])
    assert [(r["modulation_timestep"], r["steps_after"]) for r in m] == [(201, 3), (101, 2)]
    assert all(0 <= r["locality"] <= 1 for r in m)
    s = probes.readout_steps_sweep(ed, [voc], steps=[1, None])
    assert [(r["readout_steps"], r["mode"]) for r in s] == [(1, "DDIM"), (3, "stored noise (full)")]
    with pytest.raises(ValueError, match="not on the schedule"):
        probes.modulation_timestep_sweep(ed, [voc], timesteps=[250])


def test_k_sweep_reuses_inversion(ed, items, monkeypatch):
    calls = []
    original = EmerDiff.prepare
    monkeypatch.setattr(EmerDiff, "prepare", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    rows = probes.k_sweep(ed, items[:1], ks=(2, 3))
    assert len(calls) == 1
    assert [r["K"] for r in rows] == [2, 3]
    assert all(r["segments"] <= r["K"] and 0 <= r["vanished"] < 1 for r in rows)
    assert all(0 <= r[k] <= 100 for r in rows for k in ("miou", "miou_nearest", "miou_bilinear"))
    with pytest.raises(ValueError, match="exceed"):
        probes.k_sweep(ed, items[:1], ks=(99,))


def test_failure_entries_and_grid(ed, items):
    voc = items[0]
    seg = ed.segment(voc.image, return_difference_maps=True, progress=False)
    entries = probes.failure_entries(seg, voc.image, n=2)
    assert len(entries) >= 2 and all(e["mask"].shape == seg.lowres_labels.shape for e in entries)
    prepared = ed.prepare(voc.image, t_stop=201)
    grid = probes.difference_map_grid(ed, prepared, 0, [ed.config.modulation_layer], [201, 101], [10.0])
    assert set(grid) == {(ed.config.modulation_layer, 201, 10.0), (ed.config.modulation_layer, 101, 10.0)}
    assert all(m.shape == (128, 128) for m in grid.values())


# ------------------------------------------------------------------ readout_steps everywhere
def test_every_sweep_works_with_readout_steps_set(tiny_model, fast_config, items):
    """With the reduced readout, prepare skips the inversion; every sweep must still run, and the
    full-schedule rows of readout_steps_sweep must equal those of a config without readout_steps."""
    voc = items[0]
    ed = EmerDiff(tiny_model, fast_config.replace(readout_steps=2))
    layer = ed.config.modulation_layer
    assert [r["layer"] for r in probes.modulation_layer_probe(ed, [voc], layers=[layer])] == [layer]
    rows = probes.lambda_sweep(ed, [voc], strengths=(-5.0, 5.0))
    assert all(r["energy"] > 0 for r in rows)
    rows = probes.modulation_timestep_sweep(ed, [voc], timesteps=[401, 201])
    assert [r["modulation_timestep"] for r in rows] == [401, 201] and all(r["energy"] > 0 for r in rows)
    assert [r["K"] for r in probes.k_sweep(ed, [voc], ks=(2, 3))] == [2, 3]
    got = probes.readout_steps_sweep(ed, [voc], steps=(1, None))
    want = probes.readout_steps_sweep(EmerDiff(tiny_model, fast_config), [voc], steps=(1, None))
    for g, w in zip(got, want):
        assert g["readout_steps"] == w["readout_steps"]
        assert g["miou"] == pytest.approx(w["miou"]) and g["locality"] == pytest.approx(w["locality"], abs=1e-5)
    prepared = ed.prepare(voc.image, t_stop=401)
    grid = probes.difference_map_grid(ed, prepared, 0, [layer], [401, 201], [10.0])
    assert all(m.shape == (128, 128) and m.max() > 0 for m in grid.values())
