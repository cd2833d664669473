"""EmerDiff end to end on the tiny pipeline: batching, lambda = 0, seeds, sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerdiff import EmerDiff, EmerDiffConfig, Segmentation
from emerdiff.method.modulation import CallCounter, difference_maps, expected_unet_calls


@pytest.fixture
def prepared(tiny_model, fast_config, photo):
    seg = EmerDiff(tiny_model, fast_config)
    return seg, seg.prepare(photo)


def _run(seg, prep, masks, **kw):
    return seg.modulate(prep, masks=masks, **kw)


@pytest.mark.parametrize("share", [True, False])
def test_batched_equals_per_mask_loop(prepared, share):
    seg, prep = prepared
    masks = prep.masks()
    loop = torch.cat([_run(seg, prep, masks[i:i + 1], max_batch=3, attention_injection=share)[0]
                      for i in range(masks.shape[0])])
    for max_batch in ((2, 16) if share else (5,)):  # chunking with and without a ragged last chunk
        batched, _ = _run(seg, prep, masks, max_batch=max_batch, attention_injection=share)
        assert batched.shape == loop.shape
        assert torch.allclose(batched, loop, atol=1e-4), max_batch


def test_shared_sdpa_equals_explicit_path_end_to_end(prepared):
    seg, prep = prepared
    masks = prep.masks()[:2]
    a, _ = _run(seg, prep, masks, explicit_probabilities=False)
    b, _ = _run(seg, prep, masks, explicit_probabilities=True)
    assert torch.allclose(a, b, atol=1e-4)


def test_lambda_zero_gives_zero_maps_and_exact_replay(prepared):
    seg, prep = prepared
    latents, reference = _run(seg, prep, prep.masks(), modulation_strength=0.0)
    assert (reference - prep.inversion.x0).abs().max() < 1e-4  # unmodulated replay is the image latent
    maps, _ = difference_maps(seg.model, latents)
    assert float(maps.abs().max()) < 1e-4  # float noise of batched kernels; pixels span [-1, 1]


def test_modulation_changes_the_result(prepared):
    seg, prep = prepared
    latents, reference = _run(seg, prep, prep.masks())
    plus, minus = latents[0::2], latents[1::2]
    assert float((plus - minus).abs().max()) > 1e-3
    assert float((plus - reference).abs().max()) > 1e-3


def test_call_counts(prepared):
    seg, prep = prepared
    counter = CallCounter()
    masks = prep.masks()
    _run(seg, prep, masks, max_batch=4, counter=counter)
    steps = len([t for t in prep.inversion.inverted_timesteps if t <= seg.config.modulation_timestep])
    assert counter.calls["modulation"] == expected_unet_calls(masks.shape[0], steps, 4)
    assert prep.counter.calls == {"inversion": steps}  # features came free with the inversion


def test_segment_outputs(tiny_model, fast_config, photo):
    seg = EmerDiff(tiny_model, fast_config).segment(photo, return_difference_maps=True, progress=False)
    assert isinstance(seg, Segmentation)
    k = seg.num_segments
    assert 2 <= k <= 4
    assert seg.labels.shape == seg.nearest_labels.shape == seg.bilinear_labels.shape == (512, 512)
    assert seg.lowres_labels.shape == (4, 4)
    assert seg.labels.max() < k and seg.labels.min() >= 0
    assert seg.difference_maps.shape == (k, 128, 128)
    assert seg.mask_embeddings.shape == (k, 64) and seg.query_features.shape == (16, 64)
    assert seg.locality.shape == (k,) and ((seg.locality >= 0) & (seg.locality <= 1)).all()
    assert {"encode", "inversion", "kmeans", "modulation", "decode", "assign", "total"} <= set(seg.timings)
    assert seg.config["num_clusters"] == 4 and seg.unet_calls["inversion"] == 3
    # nearest baseline is the low-res map blown up
    assert seg.nearest_labels[0, 0] == seg.lowres_labels[0, 0]
    assert seg.nearest_labels[-1, -1] == seg.lowres_labels[-1, -1]


def test_segment_image_guided_baselines(tiny_model, fast_config, photo):
    """The guided filter and joint bilateral baselines read the same segments, guided by the image at the
    model resolution with the config's parameters, and come back at the input's size."""
    from emerdiff.method.readout import guided_filter_upsample, joint_bilateral_upsample
    from emerdiff.sd.images import load_image, resize_labels, to_model_input

    cfg = fast_config.replace(guided_radius=6, guided_eps=1e-3, bilateral_sigma_space=3.0, bilateral_sigma_color=0.2)
    seg = EmerDiff(tiny_model, cfg).segment(photo, progress=False)
    guide = (to_model_input(load_image(photo), 128)[0] + 1) / 2
    args = (seg.query_features, seg.centroids, (4, 4), guide)
    expected_gf = resize_labels(guided_filter_upsample(*args, 6, 1e-3), (512, 512))
    expected_jb = resize_labels(joint_bilateral_upsample(*args, 3.0, 0.2), (512, 512))
    np.testing.assert_array_equal(seg.guided_filter_labels, expected_gf)
    np.testing.assert_array_equal(seg.joint_bilateral_labels, expected_jb)
    for labels in (seg.guided_filter_labels, seg.joint_bilateral_labels):
        assert labels.shape == (512, 512) and set(np.unique(labels)) <= set(range(seg.num_segments))
    # the parameters reach the readout: another radius changes the guided filter's labels
    other = EmerDiff(tiny_model, cfg.replace(guided_radius=20)).segment(photo, progress=False)
    assert not np.array_equal(other.guided_filter_labels, seg.guided_filter_labels)
    np.testing.assert_array_equal(other.bilinear_labels, seg.bilinear_labels)


def test_same_seed_bit_identical(tiny_model, fast_config, photo):
    a = EmerDiff(tiny_model, fast_config).segment(photo, return_difference_maps=True, progress=False)
    b = EmerDiff(tiny_model, fast_config).segment(photo, return_difference_maps=True, progress=False)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.lowres_labels, b.lowres_labels)
    assert np.array_equal(a.difference_maps, b.difference_maps)
    c = EmerDiff(tiny_model, fast_config.replace(seed=1)).segment(photo, return_difference_maps=True, progress=False)
    assert c.labels.shape == a.labels.shape  # other seeds run; results may differ
    assert not np.array_equal(a.difference_maps, c.difference_maps)


@pytest.mark.parametrize("h,w", [(64, 200), (300, 90), (1200, 1700)])
def test_labels_have_input_size(tiny_model, fast_config, h, w):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    seg = EmerDiff(tiny_model, fast_config.replace(num_clusters=3)).segment(img, progress=False)
    assert seg.labels.shape == (h, w) and seg.bilinear_labels.shape == (h, w)
    assert seg.guided_filter_labels.shape == seg.joint_bilateral_labels.shape == (h, w)
    assert seg.image_size == (h, w)


def test_k_larger_than_tokens(tiny_model, fast_config):
    with pytest.raises(ValueError, match="K|num_clusters"):
        EmerDiff(tiny_model, fast_config.replace(num_clusters=17))


def test_feature_draws_and_off_inversion_timestep(tiny_model, fast_config, photo):
    """t_f above t_m needs its own call; several draws are averaged in one batch."""
    cfg = fast_config.replace(feature_timestep=501, feature_noise_draws=3)
    e = EmerDiff(tiny_model, cfg)
    prep = e.prepare(photo)
    assert prep.counter.calls["features"] == 1 and prep.counter.samples["features"] == 3
    assert prep.segments.features.shape == (16, 64)


def test_reduced_readout_steps(tiny_model, fast_config, photo):
    """readout_steps: no inversion calls, same low-res segments, n UNet calls per chunk."""
    cfg = fast_config.replace(num_inference_steps=20, modulation_timestep=301, readout_steps=2)
    e = EmerDiff(tiny_model, cfg)
    prep = e.prepare(photo)
    assert prep.counter.calls == {"features": 1}  # x_t are sampled; the readout reads no noise map
    full = EmerDiff(tiny_model, cfg.replace(readout_steps=None)).prepare(photo)
    assert np.array_equal(prep.segments.labels, full.segments.labels)
    assert torch.equal(prep.inversion.noisy[301], full.inversion.noisy[301])
    counter = CallCounter()
    maps, _ = e.perturb(prep, counter=counter)
    chunks = -(-2 * prep.segments.num_segments // (cfg.max_batch - 1))
    assert counter.calls["modulation"] == 2 * chunks
    assert maps.shape[0] == prep.segments.num_segments and float(maps.max()) > 0
    seg = e.segment(photo, progress=False)
    assert seg.unet_calls == {"features": 1, "modulation": 2 * chunks}


@pytest.mark.slow
def test_full_size_sd15_unet_one_modulated_step():
    """Real SD 1.5 layer paths and shapes: 64x64 latent, 16x16 query grid, one modulated step."""
    from types import SimpleNamespace

    from builders import random_unet

    from emerdiff.method.attention import AttentionController, controlled_attention
    from emerdiff.method.features import cluster_features
    from emerdiff.method.modulation import signed_coefficients, unet_forward

    unet = random_unet("sd15")
    model = SimpleNamespace(unet=unet, empty_embedding=torch.randn(1, 77, 768))
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    query = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    layer = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    ctl = AttentionController(capture_layers={query})
    with controlled_attention(unet, ctl):
        unet_forward(model, x, 281)
    q = ctl.captured[query][0]
    assert q.shape == (256, 1280)
    segs = cluster_features(q, (16, 16), 3, n_init=1)
    coeffs = signed_coefficients(torch.from_numpy(segs.masks()[:1]), 10.0)
    batch = torch.cat([torch.zeros(1, 256), coeffs])
    ctl = AttentionController(modulation_layer=layer, modulation=batch, share_attention=True,
                              latent_size=(64, 64), modulation_grid=(16, 16))
    with controlled_attention(unet, ctl):
        out = unet_forward(model, x.expand(3, -1, -1, -1), 281)
    assert out.shape == (3, 4, 64, 64)
    assert float((out[1] - out[2]).abs().max()) > 0  # +lambda and -lambda differ


def test_bfloat16_runs_on_cpu(tiny_dir, photo):
    """Half-precision path (the CUDA default is fp16; bf16 is the one CPUs run)."""
    from emerdiff import load_pipeline

    model = load_pipeline(tiny_dir, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    cfg = EmerDiffConfig(resolution=128, num_clusters=2, num_inference_steps=5, modulation_timestep=201,
                         kmeans_n_init=1, max_batch=5)
    seg = EmerDiff(model, cfg).segment(photo, progress=False)
    assert seg.labels.shape == (512, 512) and np.isfinite(seg.locality).all()


def test_float16_rejected_on_cpu(tiny_dir):
    from emerdiff import load_pipeline

    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        load_pipeline(tiny_dir, device="cpu", dtype="float16")


def test_out_of_memory_is_retried_in_smaller_chunks(prepared, monkeypatch):
    """A CUDA OOM in a big chunk halves the chunk and retries; results equal the unchunked run."""
    import emerdiff.method.modulation as modulation

    seg, prep = prepared
    masks = prep.masks()
    expected, _ = _run(seg, prep, masks, max_batch=3)
    real = modulation.unet_forward
    seen = []

    def flaky(model, x, t, counter=None, stage="unet"):
        seen.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, t, counter, stage)

    monkeypatch.setattr(modulation, "unet_forward", flaky)
    got, _ = _run(seg, prep, masks, max_batch=16)
    assert seen[:4] == [9, 8, 4, 2]  # 1 + 8 rows failed, then 1 + 7, 1 + 3; 1 + 1 fits
    assert set(seen[4:]) == {2}
    assert torch.allclose(got, expected, atol=1e-4)


def test_other_errors_are_not_swallowed(prepared, monkeypatch):
    import emerdiff.method.modulation as modulation

    seg, prep = prepared

    def broken(*a, **k):
        raise RuntimeError("shape mismatch somewhere")

    monkeypatch.setattr(modulation, "unet_forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _run(seg, prep, prep.masks())


# --------------------------------------------------------------------------- refine
def test_refine_with_the_pipelines_own_segments_reproduces_segment(tiny_model, fast_config, photo):
    """Given segment's own k-means labels, at the grid's size or upsampled 8x, refine reproduces it."""
    ed = EmerDiff(tiny_model, fast_config)
    seg = ed.segment(photo, return_difference_maps=True, progress=False)
    low = seg.lowres_labels
    for given in (low, np.kron(low, np.ones((8, 8), dtype=np.int64))):
        ref = ed.refine(photo, given, return_difference_maps=True, progress=False)
        assert np.array_equal(ref.lowres_labels, low)
        assert np.array_equal(ref.labels, seg.labels)
        assert np.array_equal(ref.nearest_labels, seg.nearest_labels)
        np.testing.assert_array_equal(ref.difference_maps, seg.difference_maps)


def test_refine_a_hand_drawn_two_region_map(tiny_model, fast_config, photo):
    """Any label values and size: a left/right split drawn at 37x50 with ids 7 and 255 -> 2 segments;
    the nearest baseline is the projected split and EmerDiff's labels use both ids."""
    drawing = np.full((37, 50), 7, dtype=np.int64)
    drawing[:, 25:] = 255
    ed = EmerDiff(tiny_model, fast_config)
    ref = ed.refine(photo, drawing, progress=False)
    h, w = ref.lowres_labels.shape
    assert ref.num_segments == 2
    assert (ref.lowres_labels[:, : w // 2] == 0).all() and (ref.lowres_labels[:, w // 2:] == 1).all()
    assert set(np.unique(ref.labels)) <= {0, 1}


def test_project_labels_majority_and_errors():
    from emerdiff.method.features import project_labels

    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:3, :4] = 5  # 12 of the 16 pixels of token (0, 0) at a 2x2 grid
    assert project_labels(labels, (2, 2)).tolist() == [[1, 0], [0, 0]]
    assert project_labels(np.array([[3, 4]]), (2, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]  # coarser: upsampled
    with pytest.raises(ValueError, match="2-D"):
        project_labels(np.zeros((2, 2, 3)), (2, 2))
    with pytest.raises(ValueError, match="integers"):
        project_labels(np.full((4, 4), 0.5), (2, 2))


# --------------------------------------------------------------------------- modulate
def test_modulate_is_the_one_step_c_entry_point(prepared):
    """Overrides are config fields, checked; perturb's maps come from modulate's latents."""
    seg, prep = prepared
    latents, reference = seg.modulate(prep, [0, 2])
    assert latents.shape[0] == 4 and reference.shape[0] == 1
    maps, _ = seg.perturb(prep, [0, 2])
    torch.testing.assert_close(maps, difference_maps(seg.model, latents, 8)[0])
    flipped, _ = seg.modulate(prep, [0], modulation_strength=-seg.config.modulation_strength)
    torch.testing.assert_close(flipped[0], latents[1], atol=1e-5, rtol=1e-4)  # +(-l) is -(+l)
    with pytest.raises(ValueError, match="cannot override.*num_clusters"):
        seg.modulate(prep, num_clusters=3)
    with pytest.raises(ValueError, match="unknown modulation_layer"):
        seg.modulate(prep, modulation_layer="nope")
    with pytest.raises(ValueError, match="mask_ids or masks"):
        seg.modulate(prep, [0], masks=prep.masks()[:1])


def test_start_timestep_check(tiny_model, fast_config, photo):
    """Full readout needs the timestep inverted; the reduced readout can start anywhere."""
    seg = EmerDiff(tiny_model, fast_config)
    prep = seg.prepare(photo)  # inverted up to t_m = 201
    with pytest.raises(ValueError, match=r"timestep 401 was not inverted.*t_stop=401.*readout_steps"):
        seg.modulate(prep, [0], modulation_timestep=401)
    latents, _ = seg.modulate(prep, [0], modulation_timestep=401, readout_steps=2)
    assert torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="not on the"):
        prep.check_start(400, 2)
