"""DiffSeg (emerdiff/method/diffseg.py): aggregation, KL merging, labels, and lowres="diffseg" in Step A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emerdiff import EmerDiff, EmerDiffConfig
from emerdiff.method.diffseg import (
    DiffSegResult,
    aggregate_attention,
    anchor_grid,
    capture_self_attention,
    diffseg,
    diffseg_labels,
    merge_attention,
    projected_owners,
    proposal_argmax,
    run_diffseg,
    self_attention_layers,
    symmetric_kl,
)
from emerdiff.method.features import project_labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: much faster than two on the shared, busy test CPU (README, --threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------ synthetic maps
def blob_attention(regions: np.ndarray, inside: float = 0.95) -> torch.Tensor:
    """Attention maps of an ideal model on a label map: every query attends to its own region
    (mass ``inside``, uniform there) and a little to everything else."""
    flat = torch.as_tensor(regions.reshape(-1))
    same = (flat[:, None] == flat[None, :]).double()
    n = flat.numel()
    p = inside * same / same.sum(1, keepdim=True) + (1 - inside) / n
    return p / p.sum(1, keepdim=True)


def quadrants(size: int = 16) -> np.ndarray:
    r = np.zeros((size, size), dtype=np.int64)
    r[: size // 2, size // 2:] = 1
    r[size // 2:, : size // 2] = 2
    r[size // 2:, size // 2:] = 3
    return r


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming the ids."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_symmetric_kl_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, 30, generator=g, dtype=torch.float64).softmax(1)
    q = torch.rand(4, 30, generator=g, dtype=torch.float64).softmax(1)
    kl = symmetric_kl(p, q)
    for i in range(5):
        for j in range(4):
            want = 0.5 * ((p[i] * (p[i] / q[j]).log()).sum() + (q[j] * (q[j] / p[i]).log()).sum())
            assert kl[i, j].item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(symmetric_kl(p, p).diagonal(), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(symmetric_kl(p, q), symmetric_kl(q, p).T)


def test_symmetric_kl_survives_zero_probabilities():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    kl = symmetric_kl(p, p)
    assert torch.isfinite(kl).all()
    assert kl[0, 0] == 0 and kl[0, 1] > 5  # disjoint supports: far apart


def test_identical_maps_merge_and_disjoint_ones_do_not():
    # two regions: 8 identical maps on the left, 8 on the right, disjoint supports
    regions = np.array([[0] * 4 + [1] * 4] * 2)
    attn = blob_attention(regions, inside=1.0)
    proposals = merge_attention(attn, (2, 8), kl_threshold=1.1, iterations=3, anchors=8)
    assert proposals.shape[0] == 2
    labels = proposal_argmax(proposals, (2, 8)).numpy()
    assert same_partition(labels, regions)


def test_merge_recovers_known_blobs():
    regions = quadrants(16)
    attn = blob_attention(regions)
    proposals = merge_attention(attn, (16, 16), kl_threshold=1.1, iterations=3, anchors=16)
    labels = proposal_argmax(proposals, (16, 16)).numpy()
    assert proposals.shape[0] == 4
    assert same_partition(labels, regions)
    assert torch.allclose(proposals.sum(1), torch.ones(4, dtype=proposals.dtype))


def test_merge_recovers_irregular_blobs_from_a_sparse_anchor_grid():
    """Non-rectangular regions of different sizes; 4x4 anchors on a 24x24 grid reach every region."""
    yy, xx = np.mgrid[:24, :24]
    regions = np.zeros((24, 24), dtype=np.int64)
    regions[(yy - 6) ** 2 + (xx - 6) ** 2 < 30] = 1  # disc
    regions[yy > xx + 8] = 2  # triangle
    regions[(yy > 14) & (xx > 14)] = 3  # square
    attn = blob_attention(regions)
    proposals = merge_attention(attn, (24, 24), 1.1, 3, anchors=4)
    assert same_partition(proposal_argmax(proposals, (24, 24)).numpy(), regions)


def test_the_threshold_decides_what_merges():
    """Two regions whose maps overlap: a loose threshold merges them, a tight one keeps two."""
    regions = np.array([[0] * 8 + [1] * 8] * 4)
    attn = blob_attention(regions, inside=0.6)  # 40 % spread everywhere: maps are close
    between = symmetric_kl(attn[:1], attn[-1:]).item()
    loose = merge_attention(attn, (4, 16), kl_threshold=between * 1.5, iterations=3, anchors=4)
    tight = merge_attention(attn, (4, 16), kl_threshold=between * 0.5, iterations=3, anchors=4)
    assert loose.shape[0] == 1
    assert tight.shape[0] == 2


def test_more_iterations_never_add_proposals():
    g = torch.Generator().manual_seed(1)
    attn = (torch.randn(64, 64, generator=g, dtype=torch.float64) * 3).softmax(1)
    counts = [merge_attention(attn, (8, 8), 2.0, n, anchors=8).shape[0] for n in (1, 2, 3, 4)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 64  # iteration 1 keeps one proposal per anchor


def test_anchor_grid_is_the_official_one_on_64x64():
    a = anchor_grid((64, 64), 16)
    rows, cols = np.unique(a // 64), np.unique(a % 64)
    assert len(a) == 256
    assert rows.tolist() == list(range(1, 62, 4)) == cols.tolist()  # 1, 5, ..., 61


@pytest.mark.parametrize("grid,points", [((16, 16), 16), ((4, 4), 16), ((8, 12), 3), ((5, 5), 1)])
def test_anchor_grid_stays_on_the_grid(grid, points):
    a = anchor_grid(grid, points)
    assert len(a) == min(points, grid[0]) * min(points, grid[1])
    assert len(set(a.tolist())) == len(a)
    assert a.min() >= 0 and a.max() < grid[0] * grid[1]


# --------------------------------------------------------------- aggregation
def test_aggregation_of_one_resolution_is_the_map_itself():
    attn = blob_attention(quadrants(8)).float()
    out, grid = aggregate_attention([(attn, (8, 8)), (attn, (8, 8))])
    assert grid == (8, 8)
    assert torch.allclose(out, attn, atol=1e-6)


def test_aggregation_sd_shapes_weights_and_normalisation():
    """SD 1.x at 512 px: 5 layers each at 64/32/16, 1 at 8 -> (4096, 4096) on 64x64."""
    layers = []
    for side, n in ((64, 5), (32, 5), (16, 5), (8, 1)):
        uniform = torch.full((side * side, side * side), 1.0 / (side * side))
        layers += [(uniform, (side, side))] * n
    out, grid = aggregate_attention(layers)
    assert grid == (64, 64) and out.shape == (4096, 4096)
    assert torch.allclose(out.sum(1), torch.ones(4096), atol=1e-4)
    assert torch.allclose(out, torch.full_like(out, 1 / 4096), rtol=1e-3)


def test_aggregation_upsamples_keys_and_repeats_queries():
    """A coarse map that attends to one cell lands on that cell's block; weights follow the side length."""
    fine = torch.eye(16).double()  # 4x4 grid, each query attends only to itself
    coarse = torch.zeros(4, 4).double()
    coarse[:, 0] = 1.0  # 2x2 grid, every query attends to the top-left cell
    out, grid = aggregate_attention([(fine, (4, 4)), (coarse, (2, 2))])
    assert grid == (4, 4)
    w_fine, w_coarse = 4 / 6, 2 / 6  # side lengths 4 and 2
    assert torch.allclose(out.sum(1), torch.ones(16, dtype=out.dtype), atol=1e-6)
    # the coarse part is the same for every query and concentrated top-left
    coarse_part = (out - w_fine * fine) / w_coarse
    assert torch.allclose(coarse_part, coarse_part[:1].expand(16, -1), atol=1e-6)
    top_left = coarse_part[0].reshape(4, 4)
    assert top_left[:2, :2].sum() > 0.7 and top_left[0, 0] == top_left.max()


def test_aggregation_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="must be"):
        aggregate_attention([(torch.ones(10, 10), (4, 4))])
    with pytest.raises(ValueError, match="no attention maps"):
        aggregate_attention([])


# ------------------------------------------------------------------ labelling
def test_projected_owners_follow_project_labels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        fine = rng.integers(0, 6, size=(16, 16))
        fine[rng.random((16, 16)) < 0.7] = 0  # label 0 dominant: others get dropped at 4x4
        projected = project_labels(fine, (4, 4))
        owners = projected_owners(fine, projected)
        assert len(owners) == projected.max() + 1
        assert (np.diff(owners) > 0).all()  # project_labels keeps the original order
        # every projected id is the majority DiffSeg label of its tokens
        for p, o in enumerate(owners):
            cells = fine.reshape(4, 4, 4, 4).transpose(0, 2, 1, 3).reshape(16, 16)[projected.ravel() == p]
            assert np.bincount(cells.ravel(), minlength=6).argmax() == o


def test_pixel_labels_in_projected_ids():
    regions = quadrants(16)
    regions[:2, :2] = 4  # a small segment that a 4x4 grid cannot hold
    proposals = merge_attention(blob_attention(regions), (16, 16), 1.1, 3, 16)
    labels = proposal_argmax(proposals, (16, 16)).numpy()
    result = DiffSegResult(labels, proposals.float(), (16, 16), 256)
    assert result.num_segments == 5
    own = result.pixel_labels((64, 64))
    assert len(np.unique(own)) == 5
    projected = project_labels(labels, (4, 4))
    assert projected.max() + 1 == 4
    shared = result.pixel_labels((64, 64), resolution=32, projected=projected)
    assert shared.shape == (64, 64) and set(np.unique(shared)) == {0, 1, 2, 3}
    # where the four big segments are, the shared ids are the projected ones
    up = np.kron(projected, np.ones((16, 16), dtype=np.int64))
    big = np.kron(regions, np.ones((4, 4), dtype=np.int64)) != 4
    assert (shared[big] == up[big]).mean() > 0.95


# ----------------------------------------------------------------- config
def test_config_fields_and_validation():
    cfg = EmerDiffConfig()
    assert cfg.lowres == "kmeans"
    assert (cfg.diffseg_timestep, cfg.diffseg_kl_threshold, cfg.diffseg_iterations, cfg.diffseg_anchors,
            cfg.diffseg_refine, cfg.diffseg_add_noise) == (300, 1.1, 3, 16, False, False)
    EmerDiffConfig(lowres="diffseg").check_values()
    bad = [
        (dict(lowres="sam"), "lowres must be one of"),
        (dict(lowres="DiffSeg"), "lowres must be one of"),
        (dict(diffseg_kl_threshold=0), "diffseg_kl_threshold must be > 0"),
        (dict(diffseg_kl_threshold=float("nan")), "finite"),
        (dict(diffseg_iterations=0), "diffseg_iterations must be >= 1"),
        (dict(diffseg_anchors=0), "diffseg_anchors must be >= 1"),
        (dict(diffseg_anchors=2.5), "diffseg_anchors must be an integer"),
        (dict(diffseg_timestep=1000), r"diffseg_timestep must lie in \[0, 999\]"),
        (dict(diffseg_refine="yes"), "diffseg_refine must be True or False"),
    ]
    for changes, message in bad:
        with pytest.raises(ValueError, match=message):
            EmerDiffConfig(**changes).check_values()
    with pytest.raises(ValueError, match="unknown EmerDiffConfig field"):
        EmerDiffConfig.from_dict({"diffseg_threshold": 1.0})
    assert EmerDiffConfig.from_dict(EmerDiffConfig(lowres="diffseg").to_dict()).lowres == "diffseg"


def test_bad_lowres_fails_before_any_work(tiny_model, fast_config):
    with pytest.raises(ValueError, match="lowres must be one of"):
        EmerDiff(tiny_model, fast_config.replace(lowres="dino"))


# ----------------------------------------------------------- on the tiny model
def test_capture_covers_every_self_attention_layer(tiny_model):
    layers = self_attention_layers(tiny_model.unet)
    assert layers and all(name.endswith("attn1") for name in layers)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    probs = capture_self_attention(tiny_model, x, 300)
    assert set(probs) == set(layers)
    for p in probs.values():
        assert p.shape[0] == p.shape[1]
        assert torch.allclose(p.sum(1), torch.ones(p.shape[0]), atol=1e-4)
    # the processors are restored afterwards
    assert not any(type(v).__name__ == "EmerDiffAttnProcessor" for v in tiny_model.unet.attn_processors.values())


def test_label_map_covers_the_grid(tiny_model, fast_config, photo):
    cfg = fast_config.replace(lowres="diffseg", diffseg_kl_threshold=1e-4)
    result = diffseg(tiny_model, photo, cfg)
    assert result.grid == (16, 16)  # 128 px / VAE 8 = 16x16 latent, down_blocks.0 keeps it
    assert result.labels.shape == (16, 16)
    ids = np.unique(result.labels)
    assert ids.tolist() == list(range(result.num_segments))  # every segment owns a cell, ids contiguous
    assert result.num_segments > 1
    assert result.proposals.shape == (result.num_segments, 256)


def test_thresholds_come_from_the_config(tiny_model, fast_config, photo, monkeypatch):
    import emerdiff.method.diffseg as ds

    seen = {}
    original = ds.merge_attention

    def spy(attention, grid, kl_threshold, iterations, anchors):
        seen.update(kl_threshold=kl_threshold, iterations=iterations, anchors=anchors)
        return original(attention, grid, kl_threshold, iterations, anchors)

    monkeypatch.setattr(ds, "merge_attention", spy)
    cfg = fast_config.replace(lowres="diffseg", diffseg_kl_threshold=0.37, diffseg_iterations=2, diffseg_anchors=5)
    result = diffseg(tiny_model, photo, cfg)
    assert seen == dict(kl_threshold=0.37, iterations=2, anchors=5)
    assert result.num_anchors == 25
    # and they change the outcome: a huge threshold merges everything
    assert diffseg(tiny_model, photo, cfg.replace(diffseg_kl_threshold=1e6)).num_segments == 1


def test_refine_and_noise_options_run(tiny_model, fast_config, photo):
    cfg = fast_config.replace(diffseg_kl_threshold=1e-4, diffseg_refine=True, diffseg_add_noise=True)
    result = diffseg(tiny_model, photo, cfg)
    assert result.labels.shape == (16, 16) and result.num_segments >= 1


def test_diffseg_labels_at_image_size(tiny_model, fast_config, photo):
    cfg = fast_config.replace(diffseg_kl_threshold=1e-4)
    labels = diffseg_labels(tiny_model, photo[:200, :300], cfg)
    assert labels.shape == (200, 300)
    assert labels.min() >= 0 and len(np.unique(labels)) > 1


def test_segment_end_to_end_with_diffseg(tiny_model, fast_config, photo, tmp_path):
    cfg = fast_config.replace(lowres="diffseg", diffseg_kl_threshold=1e-4)
    ed = EmerDiff(tiny_model, cfg)
    seg = ed.segment(photo, progress=False)
    grid = ed.query_grid()
    result = diffseg(tiny_model, photo, cfg)  # deterministic: the same segments again
    expected = project_labels(result.labels, grid)
    np.testing.assert_array_equal(seg.lowres_labels, expected)
    k = seg.num_segments
    assert k == expected.max() + 1 and seg.centroids.shape[0] == k and seg.locality.shape == (k,)
    for labels in (seg.labels, seg.nearest_labels, seg.bilinear_labels, seg.extra_labels["diffseg"]):
        assert labels.shape == photo.shape[:2]
        assert labels.min() >= 0 and labels.max() < k  # one id space for every method
    assert seg.unet_calls["diffseg"] == 1
    assert "diffseg" in seg.timings and seg.config["lowres"] == "diffseg"
    seg.save_npz(str(tmp_path / "seg.npz"))
    with np.load(tmp_path / "seg.npz") as z:
        np.testing.assert_array_equal(z["extra_diffseg_labels"], seg.extra_labels["diffseg"])


def test_k_varies_per_image(tiny_model, fast_config, photo):
    """K comes from DiffSeg, not num_clusters: two images can get different K."""
    cfg = fast_config.replace(lowres="diffseg", diffseg_kl_threshold=1e-4, num_clusters=2)
    ed = EmerDiff(tiny_model, cfg)
    flat = np.full((128, 128, 3), 120, dtype=np.uint8)
    ks = [ed.prepare(img).segments.num_segments for img in (photo, flat)]
    assert ks[0] != ks[1]
    assert max(ks) > cfg.num_clusters


def test_given_lowres_labels_win_over_diffseg(tiny_model, fast_config, photo):
    cfg = fast_config.replace(lowres="diffseg")
    given = np.array([[0, 0, 1, 1]] * 4)
    prepared = EmerDiff(tiny_model, cfg).prepare(photo, lowres_labels=given)
    np.testing.assert_array_equal(prepared.segments.labels, given)
    assert prepared.diffseg is None and "diffseg" not in prepared.counter.calls


def test_kmeans_default_unchanged(tiny_model, fast_config, photo):
    seg = EmerDiff(tiny_model, fast_config).segment(photo, progress=False)
    assert seg.extra_labels == {} and "diffseg" not in seg.unet_calls


def test_run_diffseg_takes_one_latent(tiny_model, fast_config):
    with pytest.raises(ValueError, match="batch 1"):
        run_diffseg(tiny_model, torch.zeros(2, 4, 16, 16), fast_config)


# ------------------------------------------------------- reference and SD 1.5
@pytest.mark.slow
def test_reference_model_diffseg():
    """The project's trained model: 16x16 self-attention grid = its query grid (so nothing is lost
    in the projection); its near-uniform self-attention merges everything at DiffSeg's tau = 1.1."""
    from emerdiff import load_pipeline
    from emerdiff.assets import model_world, weights_dir
    from emerdiff.assets.scenes import heldout_scene_seeds, make_scene
    from training.heldout import VALIDATION_START

    model = load_pipeline("reference", device="cpu")
    scene = make_scene(heldout_scene_seeds(1, start=VALIDATION_START)[0], 128, world=model_world(weights_dir()))
    cfg = EmerDiffConfig.for_model("reference", lowres="diffseg", diffseg_kl_threshold=1.1)  # DiffSeg's published tau
    assert diffseg(model, scene.image, cfg).num_segments == 1
    # the tau the project uses on this model: 6 segments on this scene (0.03 gave 26, and the readout's
    # cost grows with K)
    low = EmerDiffConfig.for_model("reference", lowres="diffseg")  # the reference preset's tau
    result = diffseg(model, scene.image, low)
    assert result.grid == (16, 16) and result.num_segments > 1
    ed = EmerDiff(model, low)
    np.testing.assert_array_equal(project_labels(result.labels, ed.query_grid()), result.labels)
    seg = ed.segment(scene.image, progress=False)
    assert seg.num_segments == result.num_segments
    assert seg.extra_labels["diffseg"].shape == scene.labels.shape


@pytest.mark.slow
def test_full_size_sd15_unet_diffseg():
    """SD 1.5 layer paths and shapes at 512 px: 16 self-attention layers on 64/32/16/8 grids,
    aggregated to (4096, 4096) on 64x64, merged from 256 anchors, projected to the 16x16 query grid."""
    from types import SimpleNamespace

    from builders import random_unet

    from emerdiff.sd.loading import feature_resolution

    unet = random_unet("sd15")
    model = SimpleNamespace(unet=unet, empty_embedding=torch.randn(1, 77, 768))
    layers = self_attention_layers(unet)
    assert len(layers) == 16
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    probs = capture_self_attention(model, x, 300)
    grids = sorted({feature_resolution(unet, name, 64) for name in layers})
    assert grids == [(8, 8), (16, 16), (32, 32), (64, 64)]
    attention, grid = aggregate_attention([(p, feature_resolution(unet, n, 64)) for n, p in probs.items()])
    assert grid == (64, 64) and attention.shape == (4096, 4096)
    proposals = merge_attention(attention, grid, 1.1, 3, 16)
    labels = proposal_argmax(proposals, grid).numpy()
    assert labels.shape == (64, 64)
    assert project_labels(labels, (16, 16)).shape == (16, 16)
