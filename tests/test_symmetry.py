"""+/- symmetry on every Segmentation: scored while segment decodes, equal to the sweep's and to
faithfulness.symmetry on images decoded in the test."""

from __future__ import annotations

import numpy as np
import pytest

from emerdiff.method.measures import SYMMETRY_CHANCE, cheap_measures, symmetry


@pytest.fixture(scope="module")
def segmented(tiny_model):
    from skimage import data

    from emerdiff import EmerDiff, EmerDiffConfig

    cfg = EmerDiffConfig(resolution=128, num_clusters=4, num_inference_steps=10, modulation_timestep=201,
                         feature_timestep=1, kmeans_n_init=2, max_batch=9, blur_sigma=1.0, decode_batch=4)
    ed = EmerDiff(tiny_model, cfg)
    image = data.astronaut()
    return ed, image, ed.segment(image, progress=False)


def test_every_segmentation_carries_symmetry_in_range(segmented):
    _, _, seg = segmented
    f = seg.faithfulness
    assert seg.symmetry is not None and seg.symmetry.shape == (seg.num_segments,)
    assert np.isfinite(seg.symmetry).all() and (np.abs(seg.symmetry) <= 1 + 1e-9).all()
    assert f["symmetry"] == pytest.approx(float(seg.symmetry.mean())) and f["symmetry_chance"] == SYMMETRY_CHANCE == 0
    assert seg.images is None  # nothing of the 2K decodes is kept to get it


def test_symmetry_equals_the_measure_on_images_decoded_here(segmented):
    """Independent path: modulate, decode I0, I+ and I- in one batch, faithfulness.symmetry."""
    from emerdiff.method.modulation import decode

    ed, image, seg = segmented
    latents, reference = ed.modulate(ed.prepare(image))
    images = decode(ed.model, latents).float()
    expected = symmetry(images[0::2], images[1::2], decode(ed.model, reference).float())
    np.testing.assert_allclose(seg.symmetry, expected, atol=1e-5)


def test_symmetry_equals_the_sweeps(segmented):
    import emerdiff

    ed, image, seg = segmented
    records = emerdiff.sweep(image, ed=ed, progress=False)  # the config's one setting, every mask
    assert [r["mask"] for r in records] == list(range(seg.num_segments))
    np.testing.assert_allclose(seg.symmetry, [r["symmetry"] for r in records], atol=1e-5)


def test_symmetry_is_scored_chunk_by_chunk(segmented, monkeypatch):
    """Memory stays bounded: each call sees at most decode_batch / 2 pairs, and the chunking does not
    change the scores (decode_batch 2: one pair at a time)."""
    import emerdiff.method.pipeline as pipeline

    ed, image, seg = segmented
    seen = []

    def recording(plus, minus, reference):
        seen.append(len(plus))
        return symmetry(plus, minus, reference)

    monkeypatch.setattr(pipeline, "symmetry", recording)
    one_pair = type(ed)(ed.model, ed.config.replace(decode_batch=2)).segment(image, progress=False)
    assert seen == [1] * seg.num_segments
    np.testing.assert_allclose(one_pair.symmetry, seg.symmetry, atol=1e-5)
    np.testing.assert_array_equal(one_pair.labels, seg.labels)


def test_mean_symmetry_leaves_out_masks_whose_runs_changed_nothing():
    low = np.array([[0, 1], [2, 2]])
    pixels = low.repeat(4, 0).repeat(4, 1)
    out = cheap_measures(np.ones(3), low, pixels, np.array([0.5, np.nan, 1.0]))
    assert out["symmetry"] == pytest.approx(0.75) and out["symmetry_chance"] == 0.0
    assert np.isnan(cheap_measures(np.ones(3), low, pixels, np.full(3, np.nan))["symmetry"])
    assert "symmetry" not in cheap_measures(np.ones(3), low, pixels)  # the caller had no symmetry to give
